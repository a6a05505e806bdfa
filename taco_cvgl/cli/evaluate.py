"""
taco-cvgl evaluate: score the localizer on a bag, a recorded run, or retrieval on a dataset.

Three ways in, one set of metrics (see taco_cvgl.evaluation.scoring for their definitions):

- a bag with camera images and ground-truth NavSatFix: every image goes through the same
  CVGLLocalizer the node runs (needs --db and --weights), with the heading prior of the
  orientation topic nearest its stamp as the node matches it (--orientation-topic, or the
  params file's orientation_topic)::

      taco-cvgl evaluate --bag drive.mcap --image-topic /camera/image_raw --gt-topic /gps/fix
          --db map.npz --weights model.safetensors --out eval/

- a bag recorded from the live node (its estimates beside the ground truth), as `ros2 bag
  record` captures it on a robot; no model is needed, and Recall@k is not available::

      taco-cvgl evaluate --bag run1 --estimate-topic /cvgl/fix --gt-topic /gps/fix --out eval/

- a dataset in the VPR benchmarks' layout (database and query images whose file names carry
  their positions, or CSVs): retrieval alone, Recall@N at --threshold-m::

      taco-cvgl evaluate --database-folder pitts30k/test/database
          --queries-folder pitts30k/test/queries --weights model.safetensors --out eval/

Each writes metrics.json (atomically, last), frames.csv (one row per frame) and PNG pictures into
--out. A run that is interrupted, meets frames it cannot localize, or stops early writes what it
scored with "complete": false.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import math
import os
from pathlib import Path
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TYPE_CHECKING

import numpy as np
from taco_cvgl.cli.common import add_settings_args, reports_errors, settings_from_args
from taco_cvgl.errors import InputError, TacoError
from taco_cvgl.evaluation.scoring import (DEFAULT_KS, frame_table, FrameResult, FrameTable,
                                          interpolate_headings, positives_within, retrieval_frames,
                                          retrieval_summary, SCHEMA, summarize)
from taco_cvgl.files import bags
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.geo.geodesy import distance_m, enu_yaw_to_heading
from taco_cvgl.localization.heading import quaternion_yaw
from taco_cvgl.localization.orientation import message_prior, MESSAGE_TYPES, OrientationBuffer
from taco_cvgl.localization.settings import defaults

if TYPE_CHECKING:   # torch loads in seconds: not before the arguments are parsed
    from taco_cvgl.localization.heading import HeadingPrior
    from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig, Measurement
    from taco_cvgl.mapdb.database import ImageRecord

QUATERNION_STAMPED_TYPE = MESSAGE_TYPES['quaternion']
IMU_TYPE = MESSAGE_TYPES['imu']
#: Topic types whose orientation gives a heading (quaternion in the ENU frame, REP-103/145).
HEADING_TYPES = (QUATERNION_STAMPED_TYPE, IMU_TYPE, bags.GEOPOSE_COV_STAMPED_TYPE,
                 bags.GEOPOSE_STAMPED_TYPE)
# A yaw variance above (2 pi)^2 rad^2 says nothing about the heading (the node publishes 1e6
# when it has none).
UNKNOWN_YAW_VARIANCE = (2.0 * math.pi) ** 2
MAX_LISTED_FAILURES = 10
GRID_CANDIDATES = 3          # retrieved entries shown per query in the retrieval grid
RECALL_UNAVAILABLE_RECORDED = (
    'a recorded bag holds the published estimates only, not the retrieved database entries; '
    'evaluate the camera bag with --image-topic --db --weights to measure Recall@k')


@dataclasses.dataclass
class EvaluationResult:
    """What an evaluation computed and wrote: the metrics.json content and each file's path."""

    metrics: Dict[str, Any]
    paths: Dict[str, Path]

    @property
    def complete(self) -> bool:
        """Return whether every frame of the bag was scored or knowingly left out."""
        return bool(self.metrics.get('complete'))


# ---------------------------------------------------------------------------------------------
# Reading the bags


def _topics(path: Path) -> Dict[str, str]:
    """Return {topic: type} of a bag (InputError naming the bag when it cannot be read)."""
    return bags.list_topics(path)


def _require(path: Path, topic: str, what: str) -> str:
    """Return the type of `topic` in the bag, or raise InputError listing the bag's topics."""
    available = _topics(path)
    if topic not in available:
        have = ', '.join(f'{t} ({m})' for t, m in available.items()) or 'none'
        raise InputError(f'bag {path} has no {what} topic {topic}; its topics: {have}')
    return available[topic]


def read_truth(path: Path, topic: str) -> bags.GpsTrack:
    """Read the ground-truth position topic; refuse one without a single usable position."""
    _require(path, topic, 'ground-truth')
    track = bags.read_navsat(path, topic)
    if len(track) == 0:
        raise InputError(f'bag {path}: ground-truth topic {topic} holds no usable position '
                         f'({track.dropped} message(s) without a fix)')
    return track


def _yaw(q) -> float:
    """Return the ENU yaw (rad, counter-clockwise from east) of a quaternion message, or NaN."""
    try:
        return quaternion_yaw(q.x, q.y, q.z, q.w)
    except InputError:   # not finite, or zero norm
        return math.nan


def _orientation_messages(path: Path, topic: str, what: str, types: Sequence[str]):
    """Yield (stamp_ns, msgtype, message) of a topic of one of `types` (InputError if not)."""
    msgtype = _require(path, topic, what)
    if msgtype not in types:
        raise InputError(f'bag {path}: topic {topic} has type {msgtype}; a {what} topic must '
                         f'be one of {", ".join(types)}')
    for _topic, msgtype, log_ns, msg in bags.iter_messages(path, [topic]):
        yield bags.stamp_ns(msg, log_ns), msgtype, msg


def read_headings(path: Path, topic: str) -> Tuple[np.ndarray, np.ndarray]:
    """
    Return (stamps_ns, compass headings in degrees) of an orientation topic.

    Reads geometry_msgs/QuaternionStamped and sensor_msgs/Imu (orientation relative to ENU, as
    REP-145 asks of an IMU; an Imu whose orientation_covariance[0] is -1 has none and is
    skipped) and the geographic_msgs GeoPose estimates (a yaw variance above (2 pi)^2 marks an
    unknown heading: NaN, as a NaN or zero quaternion does).
    """
    stamps, headings = [], []
    for stamp, msgtype, msg in _orientation_messages(path, topic, 'heading', HEADING_TYPES):
        heading = math.nan
        if msgtype == QUATERNION_STAMPED_TYPE:
            heading = enu_yaw_to_heading(_yaw(msg.quaternion))
        elif msgtype == IMU_TYPE:
            if float(msg.orientation_covariance[0]) == -1.0:
                continue
            heading = enu_yaw_to_heading(_yaw(msg.orientation))
        elif msgtype == bags.GEOPOSE_COV_STAMPED_TYPE:
            variance = float(np.asarray(msg.pose.covariance, dtype=float)[35])
            if math.isfinite(variance) and variance < UNKNOWN_YAW_VARIANCE:
                heading = enu_yaw_to_heading(_yaw(msg.pose.pose.orientation))
        else:
            heading = enu_yaw_to_heading(_yaw(msg.pose.orientation))
        stamps.append(stamp)
        headings.append(heading)
    return np.array(stamps, dtype=np.int64), np.array(headings, dtype=float)


def read_heading_priors(path: Path, topic: str, default_sigma_deg: float
                        ) -> Tuple[OrientationBuffer, Dict[str, Any]]:
    """
    Return the heading priors of an orientation topic by stamp, and what was read.

    The topic is sensor_msgs/Imu or geometry_msgs/QuaternionStamped, each message turned into a
    prior as the node does (localization.orientation.message_prior; default_sigma_deg where the
    message gives none). A message without a usable heading is counted and skipped.
    """
    kinds = {msgtype: kind for kind, msgtype in MESSAGE_TYPES.items()}
    samples, bad, reasons, msgtype = [], 0, [], None
    for stamp, msgtype, msg in _orientation_messages(path, topic, 'orientation', list(kinds)):
        prior, reason = message_prior(msg, kinds[msgtype], default_sigma_deg)
        if prior is None:
            bad += 1
            if reason not in reasons and len(reasons) < MAX_LISTED_FAILURES:
                reasons.append(reason)
        else:
            samples.append((stamp, prior))
    buffer = OrientationBuffer(max(1, len(samples)))
    for stamp, prior in samples:
        buffer.add(stamp, prior)
    return buffer, {'topic': topic, 'bag': str(path), 'type': msgtype,
                    'messages': len(samples) + bad, 'bad_messages': bad, 'bad_reasons': reasons}


def _bag_with(bag_paths: Sequence[Path], topic: str, what: str) -> Path:
    """Return the first bag that has the topic; InputError listing the first's topics if none."""
    for path in bag_paths:
        if topic in _topics(path):
            return path
    _require(bag_paths[0], topic, what)  # raises, listing the topics
    return bag_paths[0]


def _heading_truth(bag_paths: Sequence[Path], topic: Optional[str]
                   ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Read the ground-truth heading topic from the first bag that has it (None: no topic)."""
    if not topic:
        return None
    stamps, headings = read_headings(_bag_with(bag_paths, topic, 'ground-truth heading'), topic)
    known = np.isfinite(headings)
    return stamps[known], headings[known]


def _truth_at(track: bags.GpsTrack, heading: Optional[Tuple[np.ndarray, np.ndarray]],
              stamps_ns, max_gap_s: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (lat, lon, heading) of the ground truth at the stamps (NaN where unknown)."""
    lat, lon, _alt, _valid = track.interpolate_many(stamps_ns, max_gap_s)
    if heading is None:
        hdg = np.full(len(lat), np.nan)
    else:
        hdg = interpolate_headings(heading[0], heading[1], stamps_ns, max_gap_s)
    return lat, lon, hdg


# ---------------------------------------------------------------------------------------------
# Localizing a camera bag


def _check_orientation(sigma_deg: float, max_age_s: float) -> None:
    """Refuse a default sigma that is not positive or a max age below zero (as the node does)."""
    if not (math.isfinite(sigma_deg) and sigma_deg > 0):
        raise InputError(f'orientation_sigma_deg must be a positive number, got {sigma_deg}')
    if not (math.isfinite(max_age_s) and max_age_s >= 0):
        raise InputError(f'orientation_max_age_s must be a number >= 0, got {max_age_s}')


def _check_thresholds(threshold_m: float, fix_threshold_m: Optional[float],
                      max_gt_gap_s: float) -> float:
    """Refuse non-positive thresholds; return the fix threshold (default: threshold_m)."""
    fix_threshold_m = threshold_m if fix_threshold_m is None else fix_threshold_m
    for name, value in (('threshold_m', threshold_m), ('fix_threshold_m', fix_threshold_m),
                        ('max_gt_gap_s', max_gt_gap_s)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f'{name} must be a positive number, got {value}')
    return fix_threshold_m


def _fill(frame: FrameResult, m: Measurement, database=None) -> None:
    """Copy a measurement (and, given its database, the embedding-only ranking) in."""
    frame.est_lat, frame.est_lon = float(m.latitude), float(m.longitude)
    frame.est_heading = float(m.heading)
    frame.fix = bool(m.fix)
    frame.covariance_en = np.asarray(m.position_covariance, dtype=float)[:2, :2].copy()
    frame.confidence = float(m.confidence)
    frame.latency_s = float(m.latency_s)
    frame.retrieved = np.array([(x.latitude, x.longitude) for x in m.matches],
                               dtype=float).reshape(-1, 2)
    frame.retrieved_ids = [x.image_id for x in m.matches]
    frame.checked = int(m.checked) if m.verified is not None else None
    frame.no_fix_reason = m.no_fix_reason
    if database is not None and m.retrieval:
        frame.retrieval_only = np.stack([database.latitude[m.retrieval],
                                         database.longitude[m.retrieval]], axis=1).astype(float)


def _grid_picks(count: int, rows: int) -> set:
    """Return frame indices spread over the bag whose thumbnails are kept for the grid."""
    if rows <= 0 or count <= 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, min(count, 3 * rows)).round()}


def evaluate_bag(bag, image_topic: str, gt_topic: str, db, weights, out_dir, *,
                 gt_bag=None, gt_heading_topic: Optional[str] = None,
                 threshold_m: float = 25.0, fix_threshold_m: Optional[float] = None,
                 max_gt_gap_s: float = 1.0, config: Optional[LocalizerConfig] = None,
                 device: str = 'auto', precision: str = 'auto', camera_yaw_deg: float = 0.0,
                 max_frames: Optional[int] = None, grid_rows: int = 6,
                 background=None, progress: bool = True,
                 on_frame: Optional[Callable[[FrameResult], None]] = None,
                 localizer: Optional[CVGLLocalizer] = None,
                 plots: bool = True, ks: Sequence[int] = DEFAULT_KS,
                 orientation_topic: Optional[str] = None,
                 orientation_sigma_deg: float = defaults()['orientation_sigma_deg'],
                 orientation_max_age_s: float = defaults()['orientation_max_age_s']
                 ) -> EvaluationResult:
    """
    Localize every image of a bag and score it against the ground truth.

    The localizer is loaded from `weights` and `db` (checked against each other), unless a
    loaded one is passed as `localizer` (then config, device and precision are its own, and db
    and weights are only recorded in metrics.json). Frames without ground truth within
    max_gt_gap_s are counted and not localized. A frame that fails, a Ctrl-C
    (KeyboardInterrupt), a read error mid-bag or max_frames stop nothing already scored:
    metrics.json is written with complete false and says why. background: an optional
    plots.MapBackground for the track plot; plots False writes metrics.json and frames.csv
    only. on_frame is called with each frame once done. ks: the k of Recall@k.

    orientation_topic (sensor_msgs/Imu or geometry_msgs/QuaternionStamped, in `bag` or else
    `gt_bag`): each image gets the heading prior nearest its stamp within
    orientation_max_age_s, as the node matches it (orientation_sigma_deg where a message gives
    no sigma); metrics.json's heading_prior counts the frames with and without one, and
    (localizer_sources) which heading each localized frame used: given, track (the last
    verified fix), tta (rotations tried) or none.
    """
    from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
    from tqdm import tqdm

    fix_threshold_m = _check_thresholds(threshold_m, fix_threshold_m, max_gt_gap_s)
    _check_orientation(orientation_sigma_deg, orientation_max_age_s)
    if max_frames is not None and max_frames < 1:
        raise InputError(f'max_frames must be >= 1, got {max_frames}')
    bag = Path(bag)
    gt_path = Path(gt_bag) if gt_bag else bag
    stream = bags.iter_images(bag, image_topic)  # checks the bag and the topic first
    truth = read_truth(gt_path, gt_topic)
    heading = _heading_truth([gt_path, bag], gt_heading_topic)
    priors, prior_info = None, {'topic': None}
    if orientation_topic:
        priors, prior_info = read_heading_priors(
            _bag_with([bag, gt_path], orientation_topic, 'orientation'), orientation_topic,
            orientation_sigma_deg)
        prior_info.update(default_sigma_deg=orientation_sigma_deg,
                          max_age_s=orientation_max_age_s)
    counts = {'frames_with': 0, 'frames_without': 0}
    sources: Dict[str, int] = {}   # Measurement.heading_source of each localized frame
    if localizer is None:
        if db is None or weights is None:
            raise InputError('evaluating a camera bag needs the database and the weights')
        localizer = CVGLLocalizer.from_files(weights, db, device, precision,
                                             config or LocalizerConfig())
    if localizer.database is None:
        raise InputError('the localizer passed in has no map loaded')
    config = localizer.config
    database = localizer.database

    total = stream.message_count if max_frames is None else min(stream.message_count,
                                                                max_frames)
    picks = _grid_picks(total, grid_rows)
    thumbs: Dict[int, np.ndarray] = {}
    frames: List[FrameResult] = []
    stopped: Optional[str] = None
    bar = tqdm(total=total, desc='evaluating', unit='img', disable=not progress,
               dynamic_ncols=True)
    try:
        for index, (stamp, rgb) in enumerate(stream):
            if max_frames is not None and index >= max_frames:
                stopped = f'stopped after max_frames={max_frames} of {stream.message_count}'
                break
            prior = None if priors is None else priors.prior_at(stamp, orientation_max_age_s)[0]
            frame, source = _localize_frame(localizer, index, stamp, rgb, truth, heading,
                                            max_gt_gap_s, camera_yaw_deg, prior)
            frames.append(frame)
            if frame.has_truth:   # localized (or tried): counted with or without a prior
                counts['frames_with' if prior is not None else 'frames_without'] += 1
            if source is not None:
                sources[source or 'none'] = sources.get(source or 'none', 0) + 1
            if plots and index in picks:
                from taco_cvgl.evaluation.plots import thumbnail
                thumbs[index] = thumbnail(rgb)
            bar.update(1)
            if on_frame is not None:
                on_frame(frames[-1])
    except KeyboardInterrupt:
        stopped = 'interrupted (KeyboardInterrupt)'
    except InputError as exc:
        stopped = f'bag read error: {exc}'
    finally:
        bar.close()

    table = frame_table(frames, threshold_m)
    summary = summarize(frames, threshold_m, fix_threshold_m, ks,
                        database_size=len(database), max_gt_gap_s=max_gt_gap_s, table=table)
    failures = [f'frame {f.index} at {f.stamp_ns} ns: {f.failure}'
                for f in frames if f.failure is not None]
    summary['frames'].update({
        'in_bag': int(stream.message_count),
        'undecodable': int(stream.skipped),
        'failures': failures[:MAX_LISTED_FAILURES],
        'decode_errors': list(stream.errors),
    })
    complete = stopped is None and not failures and stream.skipped == 0
    inputs = {'bag': str(bag), 'image_topic': image_topic, 'gt_bag': str(gt_path),
              'gt_topic': gt_topic, 'gt_heading_topic': gt_heading_topic,
              'db': None if db is None else str(db),
              'weights': None if weights is None else str(weights),
              'database_entries': len(database),
              'model_fingerprint': database.model_fingerprint, 'top_k': config.top_k,
              'index': config.index, 'min_confidence': config.estimator.min_confidence,
              'camera_yaw_deg': camera_yaw_deg, 'max_gt_gap_s': max_gt_gap_s,
              'orientation_topic': orientation_topic or None}
    metrics = {'schema': SCHEMA, 'mode': 'localizer', 'complete': complete,
               'stopped': stopped, 'inputs': inputs, **summary,
               'heading_prior': {**prior_info, **counts, 'localizer_sources': sources},
               'warnings': _clock_warnings(frames, truth)}
    if not frames and stopped is None:
        metrics['warnings'].append(f'the image topic {image_topic} holds no decodable image')
    if priors is not None and counts['frames_without'] and not counts['frames_with']:
        metrics['warnings'].append(
            f'no frame had a heading prior: none of the {len(priors)} usable message(s) of '
            f'{orientation_topic} lies within orientation_max_age_s {orientation_max_age_s:g} s '
            f'of a frame')
    grid = _grid_rows(frames, thumbs, table, threshold_m, grid_rows) if plots else []
    paths = _write_outputs(Path(out_dir), metrics, frames, table, threshold_m,
                           (database.latitude, database.longitude), background, grid, plots)
    return EvaluationResult(metrics, paths)


def _localize_frame(localizer: CVGLLocalizer, index: int, stamp: int, rgb: np.ndarray,
                    truth: bags.GpsTrack, heading, max_gt_gap_s: float,
                    camera_yaw_deg: float, prior: Optional[HeadingPrior] = None
                    ) -> Tuple[FrameResult, Optional[str]]:
    """
    Return the frame of one image (its ground truth, the localizer's answer if any).

    And the heading the localizer used (Measurement.heading_source; None if not localized).
    """
    lat, lon, hdg = _truth_at(truth, heading, [stamp], max_gt_gap_s)
    frame = FrameResult(index=index, stamp_ns=int(stamp), truth_lat=float(lat[0]),
                        truth_lon=float(lon[0]), truth_heading=float(hdg[0]))
    if not frame.has_truth:
        return frame, None  # not localized: it could not be scored
    try:
        measurement = localizer.localize(rgb, timestamp=stamp * 1e-9,
                                         camera_yaw_deg=camera_yaw_deg, heading=prior)
    except (TacoError, RuntimeError, ValueError) as exc:
        # One frame the model cannot take (odd size, corrupt data) must not lose the others;
        # it is counted, listed and makes the result incomplete.
        frame.failure = f'{type(exc).__name__}: {exc}'
        return frame, None
    _fill(frame, measurement, localizer.database)
    return frame, measurement.heading_source


def _clock_warnings(frames: Sequence[FrameResult], truth: bags.GpsTrack) -> List[str]:
    """Warn when no frame found ground truth: stamps on different clocks are the usual cause."""
    if not frames or any(f.has_truth for f in frames):
        return []
    stamps = np.array([f.stamp_ns for f in frames], dtype=np.int64)
    return [f'no frame has ground truth within the allowed gap: the frames span '
            f'{stamps.min() * 1e-9:.3f}..{stamps.max() * 1e-9:.3f} s, the ground truth '
            f'{truth.stamps_ns[0] * 1e-9:.3f}..{truth.stamps_ns[-1] * 1e-9:.3f} s (are they '
            f'stamped on the same clock?)']


def _grid_rows(frames: Sequence[FrameResult], thumbs: Dict[int, np.ndarray],
               table: FrameTable, threshold_m: float, rows: int) -> list:
    """Return the retrieval grid's rows: kept thumbnails of scored frames, spread over the bag."""
    from taco_cvgl.evaluation.plots import Candidate, GridRow
    chosen = [f for f in frames if f.index in thumbs and table.scored[f.index]
              and len(f.retrieved)]
    if len(chosen) > rows:
        chosen = [chosen[int(i)] for i in np.linspace(0, len(chosen) - 1, rows).round()]
    grid = []
    for f in chosen:
        shown = f.retrieved[:GRID_CANDIDATES]
        dist = distance_m(f.truth_lat, f.truth_lon, shown[:, 0], shown[:, 1])
        candidates = [Candidate(image=f.retrieved_ids[r] if os.path.isfile(f.retrieved_ids[r])
                                else None,
                                label=f'top-{r + 1}: {dist[r]:.0f} m from truth',
                                hit=bool(dist[r] <= threshold_m)) for r in range(len(shown))]
        state = 'fix' if f.fix else 'no fix'
        label = (f'{Path(f.image).name} (top-1 {table.error_m[f.index]:.0f} m away)' if f.image
                 else f'frame {f.index} ({state}, error {table.error_m[f.index]:.0f} m)')
        grid.append(GridRow(query=thumbs[f.index], label=label, candidates=candidates))
    return grid


# ---------------------------------------------------------------------------------------------
# Scoring a recorded bag


def evaluate_recorded(bag, estimate_topic: str, gt_topic: str, out_dir, *, gt_bag=None,
                      image_topic: Optional[str] = None,
                      gt_heading_topic: Optional[str] = None, threshold_m: float = 25.0,
                      fix_threshold_m: Optional[float] = None, max_gt_gap_s: float = 1.0,
                      db=None, background=None, progress: bool = True,
                      plots: bool = True) -> EvaluationResult:
    """
    Score the estimates a live node published (recorded in `bag`) against ground truth.

    The estimate topic is sensor_msgs/NavSatFix (position_covariance, ENU m^2; NO_FIX messages
    count as published without a fix) or a geographic_msgs GeoPose type (covariance read on
    east, north axes as this package's node publishes it). Ground truth comes from `gt_bag`
    when given, else from `bag`. With image_topic (searched in `bag`, then `gt_bag`), the fix
    share is published fixes over images, both counted where ground truth exists. db, when
    given, only draws the map's places under the track; plots False writes no pictures.
    """
    fix_threshold_m = _check_thresholds(threshold_m, fix_threshold_m, max_gt_gap_s)
    bag = Path(bag)
    gt_path = Path(gt_bag) if gt_bag else bag
    est_type = _require(bag, estimate_topic, 'estimate')
    truth = read_truth(gt_path, gt_topic)
    heading = _heading_truth([gt_path, bag], gt_heading_topic)
    estimates = bags.read_navsat(bag, estimate_topic)
    est_heading = np.full(len(estimates), np.nan)
    if est_type in (bags.GEOPOSE_COV_STAMPED_TYPE, bags.GEOPOSE_STAMPED_TYPE):
        stamps, values = read_headings(bag, estimate_topic)
        by_stamp = dict(zip(stamps.tolist(), values.tolist()))
        est_heading = np.array([by_stamp.get(int(s), math.nan) for s in estimates.stamps_ns])

    lat, lon, hdg = _truth_at(truth, heading, estimates.stamps_ns, max_gt_gap_s)
    cov = estimates.covariance
    frames = []
    for i, stamp in enumerate(estimates.stamps_ns):
        frame = FrameResult(index=i, stamp_ns=int(stamp), truth_lat=float(lat[i]),
                            truth_lon=float(lon[i]), truth_heading=float(hdg[i]),
                            est_lat=float(estimates.lat[i]), est_lon=float(estimates.lon[i]),
                            est_heading=float(est_heading[i]), fix=True)
        if cov is not None:
            block = np.asarray(cov[i], dtype=float)[:2, :2]
            if estimates.covariance_axes.startswith('latitude'):   # GeoPose: north, east
                block = block[::-1, ::-1]
            frame.covariance_en = block.copy()
        frames.append(frame)

    images = None
    if image_topic:
        images = _count_images(image_topic, [bag, gt_path], truth, max_gt_gap_s, progress)
    table = frame_table(frames, threshold_m)
    summary = summarize(frames, threshold_m, fix_threshold_m, DEFAULT_KS,
                        recall_unavailable=RECALL_UNAVAILABLE_RECORDED,
                        images_with_truth=None if images is None else images['with_ground_truth'],
                        max_gt_gap_s=max_gt_gap_s, table=table)
    summary['frames']['no_fix_messages'] = int(estimates.dropped)
    if images is None:
        summary['fixes'].update(share=None, share_of=None, share_denominator=None,
                                share_unavailable='give --image-topic to count the images '
                                                  'the fixes were made from')
    else:
        summary['images'] = images
    database = None
    if db is not None:
        from taco_cvgl.mapdb.database import EmbeddingDatabase
        database = EmbeddingDatabase.load(db)
    inputs = {'bag': str(bag), 'estimate_topic': estimate_topic, 'estimate_type': est_type,
              'gt_bag': str(gt_path), 'gt_topic': gt_topic, 'gt_heading_topic': gt_heading_topic,
              'image_topic': image_topic, 'max_gt_gap_s': max_gt_gap_s,
              'db': None if db is None else str(db)}
    metrics = {'schema': SCHEMA, 'mode': 'recorded', 'complete': True, 'stopped': None,
               'inputs': inputs, **summary, 'warnings': _clock_warnings(frames, truth)}
    if not frames:
        metrics['warnings'].append(f'the estimate topic {estimate_topic} holds no fix')
    places = None if database is None else (database.latitude, database.longitude)
    paths = _write_outputs(Path(out_dir), metrics, frames, table, threshold_m, places,
                           background, [], plots)
    return EvaluationResult(metrics, paths)


def _count_images(topic: str, bag_paths: Sequence[Path], truth: bags.GpsTrack,
                  max_gt_gap_s: float, progress: bool) -> Dict[str, int]:
    """Count the images of a topic (in the first bag that has it) and those with ground truth."""
    from tqdm import tqdm
    for path in bag_paths:
        available = _topics(path)
        if topic in available:
            break
    else:
        _require(bag_paths[0], topic, 'image')
    if available[topic] not in (bags.IMAGE_TYPE, bags.COMPRESSED_IMAGE_TYPE):
        raise InputError(f'bag {path}: topic {topic} has type {available[topic]}, not '
                         f'{bags.IMAGE_TYPE} or {bags.COMPRESSED_IMAGE_TYPE}')
    stamps = []
    with tqdm(desc='counting images', unit='img', disable=not progress) as bar:
        for _topic, _type, log_ns, msg in bags.iter_messages(path, [topic]):
            stamps.append(bags.stamp_ns(msg, log_ns))
            bar.update(1)
    _lat, _lon, _alt, valid = truth.interpolate_many(stamps, max_gt_gap_s)
    return {'total': len(stamps), 'with_ground_truth': int(valid.sum()), 'bag': str(path)}


# ---------------------------------------------------------------------------------------------
# Retrieval on dataset folders (the VPR benchmarks' layout)

#: The fields of a VPR dataset file name (gmberton's VPR-datasets-downloader and
#: VPR-methods-evaluation), between '@' signs and before the extension; any may be empty.
VPR_FIELDS = ('utm_east', 'utm_north', 'utm_zone_number', 'utm_zone_letter', 'latitude',
              'longitude', 'pano_id', 'tile_num', 'heading', 'pitch', 'roll', 'height',
              'timestamp', 'note')
VPR_NAME = '@' + '@'.join(VPR_FIELDS) + '@.jpg'
UTM_BANDS = 'CDEFGHJKLMNPQRSTUVWX'    # latitude band letters, south to north; N on: north
DEFAULT_RECALL_VALUES = (1, 5, 10, 20)


def vpr_fields(path: Path) -> Dict[str, str]:
    """Return the named fields of a VPR file name; InputError naming the file if it is none."""
    parts = path.name.split('@')
    if len(parts) < 8 or parts[0]:
        raise InputError(f'{path}: not a VPR dataset file name ({VPR_NAME}, fields possibly '
                         f'empty); name the files so, or list them with their positions in a '
                         f'CSV (--database-csv / --queries-csv)')
    return dict(zip(VPR_FIELDS, (p.strip() for p in parts[1:-1])))


def _number(fields: Dict[str, str], name: str) -> float:
    """Return a file name field as a number (ValueError saying which field is not one)."""
    text = fields.get(name, '')
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f'{name} {text!r} is not a number') from None
    if not math.isfinite(value):
        raise ValueError(f'{name} {text!r} is not a finite number')
    return value


def _utm_to_latlon(fields: Dict[str, str]) -> Tuple[float, float]:
    """Return (latitude, longitude) of a name's WGS84 UTM fields (hemisphere from the band)."""
    east, north = _number(fields, 'utm_east'), _number(fields, 'utm_north')
    zone, band = fields.get('utm_zone_number', ''), fields.get('utm_zone_letter', '').upper()
    if not (zone.isdigit() and 1 <= int(zone) <= 60):
        raise ValueError(f'utm_zone_number {zone!r} is not a zone 1..60')
    if len(band) != 1 or band not in UTM_BANDS:
        raise ValueError(f'utm_zone_letter {band!r} is not a latitude band C..X')
    epsg = (32600 if band >= 'N' else 32700) + int(zone)
    lon, lat = _utm_transformer(epsg).transform(east, north)
    return float(lat), float(lon)


@functools.lru_cache(maxsize=None)
def _utm_transformer(epsg: int):
    """Return the pyproj transformer of one UTM zone to WGS84 degrees (made once per zone)."""
    from pyproj import Transformer
    return Transformer.from_crs(epsg, 4326, always_xy=True)


def vpr_record(path: Path) -> ImageRecord:
    """Return an image's record from its VPR file name: latitude/longitude, else UTM."""
    from taco_cvgl.mapdb.database import check_coordinates, checked_heading, ImageRecord
    fields = vpr_fields(path)
    try:
        if fields.get('latitude') and fields.get('longitude'):
            lat, lon = _number(fields, 'latitude'), _number(fields, 'longitude')
        else:
            lat, lon = _utm_to_latlon(fields)
        heading = _number(fields, 'heading') if fields.get('heading') else math.nan
    except ValueError as exc:
        raise InputError(f'{path}: {exc} (a VPR file name is {VPR_NAME}, with latitude and '
                         f'longitude or the UTM fields)') from None
    check_coordinates(lat, lon, str(path))
    return ImageRecord(str(path), lat, lon, heading=checked_heading(heading, str(path)))


def dataset_records(folder: Optional[Path], csv_file: Optional[Path], side: str
                    ) -> List[ImageRecord]:
    """
    Return one side's images with their positions: from a CSV, else the folder's file names.

    The CSV is build-db's (image_path,latitude,longitude[,heading][,altitude]; relative paths
    taken from the folder when given, else from the CSV's own folder).
    """
    from taco_cvgl.mapdb.database import iter_image_files, read_csv
    if csv_file is not None:
        return read_csv(csv_file, folder)
    if folder is None:
        raise InputError(f'give the {side} images: --{side}-folder DIR (VPR file names) or '
                         f'--{side}-csv FILE')
    if not folder.is_dir():
        raise InputError(f'--{side}-folder {folder}: no such folder')
    images = list(iter_image_files(folder))
    if not images:
        raise InputError(f'--{side}-folder {folder} holds no image (.jpg, .png, ...)')
    return [vpr_record(p) for p in images]


def _check_recall_values(values: Sequence[int]) -> Tuple[int, ...]:
    """Return the N of Recall@N sorted, refusing any below 1."""
    ks = tuple(sorted({int(v) for v in values}))
    if not ks or ks[0] < 1:
        raise InputError(f'--recall-values must be whole numbers >= 1, got {list(values)}')
    return ks


def evaluate_folders(weights, out_dir, database=None, queries=None, *, database_csv=None,
                     queries_csv=None, threshold_m: float = 25.0,
                     recall_values: Sequence[int] = DEFAULT_RECALL_VALUES,
                     device: str = 'auto', precision: str = 'auto', batch_size: int = 32,
                     grid_rows: int = 6, progress: bool = True,
                     plots: bool = True) -> EvaluationResult:
    """
    Score image retrieval on a dataset: every query ranks the database images by embedding.

    Each side is a folder of images named in the VPR convention (VPR_NAME) or a CSV; the
    ranking is exact (inner product of the embeddings). Recall@N counts the queries with a
    database image within threshold_m; those without one are counted apart (see
    evaluation.retrieval_summary). Writes database.npz and queries.npz (the embeddings, fp32,
    in build-db's format: the database one serves the node as it is), frames.csv (one row per
    query), the error CDF and retrieval grid pictures (unless plots is False) and last
    metrics.json into out_dir.
    """
    _check_thresholds(threshold_m, None, 1.0)
    ks = _check_recall_values(recall_values)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f'--out {out} is a file; give the folder to write metrics.json into')
    sources = {'database': (database, database_csv), 'queries': (queries, queries_csv)}
    records = {side: dataset_records(*where, side) for side, where in sources.items()}
    db, q, ranking, timing = _embed_and_rank(weights, records, sources, max(ks), device,
                                             precision, batch_size, progress)
    db_latlon = np.stack([db.latitude, db.longitude], axis=1)
    q_latlon = np.stack([q.latitude, q.longitude], axis=1)
    frames = retrieval_frames(q_latlon, q.heading, q.image_ids, db_latlon, db.heading,
                              db.image_ids, ranking)
    table = frame_table(frames, threshold_m)
    positive = positives_within(q_latlon, db_latlon, threshold_m)
    inputs = {'database_folder': database, 'database_csv': database_csv,
              'queries_folder': queries, 'queries_csv': queries_csv, 'weights': str(weights),
              'database_images': len(db), 'query_images': len(q),
              'model_fingerprint': db.model_fingerprint, 'search': 'exact',
              'recall_values': list(ks)}
    metrics = {'schema': SCHEMA, 'mode': 'retrieval', 'complete': True, 'stopped': None,
               'inputs': {k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()},
               **retrieval_summary(frames, positive, threshold_m, ks, len(db), table),
               'timing_s': timing, 'warnings': []}
    if not positive.any():
        metrics['warnings'].append(f'no query has a database image within {threshold_m:g} m')
    saved = {f'{name}_embeddings': _save_embeddings(part, out / f'{name}.npz', weights)
             for name, part in (('database', db), ('queries', q))}
    grid = _query_grid(frames, table, threshold_m, grid_rows) if plots else []
    paths = _write_outputs(out, metrics, frames, table, threshold_m, (db.latitude, db.longitude),
                           None, grid, plots, saved)
    return EvaluationResult(metrics, paths)


def _query_grid(frames: Sequence[FrameResult], table: FrameTable, threshold_m: float,
                rows: int) -> list:
    """Return the retrieval grid's rows of queries spread over the dataset (files read here)."""
    from taco_cvgl.evaluation.plots import thumbnail
    from taco_cvgl.files.image_codec import load_image_file
    thumbs = {i: thumbnail(load_image_file(frames[i].image))
              for i in _grid_picks(len(frames), rows)}
    return _grid_rows(frames, thumbs, table, threshold_m, rows)


def _embed_and_rank(weights, records: Dict[str, List[ImageRecord]], sources: Dict[str, tuple],
                    k: int, device: str, precision: str, batch_size: int, progress: bool):
    """Return (database, queries, Q x k ranking, timing_s): both sides embedded, then ranked."""
    import time
    from taco_cvgl.mapdb.database import build_database
    from taco_cvgl.mapdb.search import ExactIndex
    from taco_cvgl.model.embedder import ImageRetrievalModel
    model = ImageRetrievalModel.load(weights, device, precision)
    timing: Dict[str, float] = {}
    sides = {}
    for side, (folder, csv_file) in sources.items():
        start = time.perf_counter()
        sides[side] = build_database(model, records[side], batch_size=batch_size,
                                     progress=progress, source=str(csv_file or folder))
        timing[f'embed_{side}'] = time.perf_counter() - start
    db, q = sides['database'], sides['queries']
    start = time.perf_counter()
    ranking, _ = ExactIndex(db.embeddings, str(model.device)).search(q.embeddings, k)
    timing['search'] = time.perf_counter() - start
    return db, q, ranking, timing


def _save_embeddings(part, path: Path, weights) -> Path:
    """Write one side's embeddings (fp32: exactly what was ranked) in build-db's format."""
    try:
        return part.save(path, dtype='fp32', weights=weights)
    except OSError as exc:
        raise InputError(f'cannot write {path}: {exc.strerror or exc}') from None


# ---------------------------------------------------------------------------------------------
# Writing the results


def _atomic_text(path: Path, text: str) -> Path:
    """Write text to path through a temporary file and a rename."""
    try:
        with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8', newline='') as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise InputError(f'cannot write {path}: {err}') from None
    return path


def _json_safe(value):
    """Return value with NaN/inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _frames_csv(frames: Sequence[FrameResult], table: FrameTable) -> str:
    """Return one CSV row per frame (NaN fields left empty)."""
    def num(value, digits=3):
        return '' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(['index', 'stamp_ns', 'status', 'truth_lat', 'truth_lon', 'est_lat',
                     'est_lon', 'fix', 'error_m', 'mahalanobis', 'heading_error_deg',
                     'first_hit_rank', 'retrieval_first_hit_rank', 'confidence',
                     'latency_s', 'top1_id', 'failure', 'image'])
    for i, f in enumerate(frames):
        status = ('failed' if f.failure else 'scored' if table.scored[i]
                  else 'no_ground_truth')
        rank = int(table.first_hit_rank[i])
        retrieval_rank = int(table.retrieval_first_hit_rank[i])
        writer.writerow([f.index, f.stamp_ns, status, num(f.truth_lat, 8), num(f.truth_lon, 8),
                         num(f.est_lat, 8), num(f.est_lon, 8), int(f.fix),
                         num(table.error_m[i], 2), num(table.mahalanobis[i]),
                         num(table.heading_error_deg[i], 2),
                         rank if rank >= 0 and len(f.retrieved) else '',
                         retrieval_rank if retrieval_rank >= 0 and len(f.retrieval_only)
                         else '',
                         num(f.confidence), num(f.latency_s, 4),
                         f.retrieved_ids[0] if f.retrieved_ids else '', f.failure or '',
                         f.image])
    return out.getvalue()


def _write_outputs(out: Path, metrics: Dict[str, Any], frames: Sequence[FrameResult],
                   table: FrameTable, threshold_m: float, places, background,
                   grid: list, draw: bool = True,
                   written: Optional[Dict[str, Path]] = None) -> Dict[str, Path]:
    """
    Write frames.csv, the plots (when draw) and last metrics.json; return their paths.

    written: files the caller already wrote into `out`, listed in metrics.json's outputs too.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f'cannot create output folder {out}: {err}') from None
    paths: Dict[str, Path] = {
        **(written or {}),
        'frames_csv': _atomic_text(out / 'frames.csv', _frames_csv(frames, table))}
    if draw:
        paths.update(_draw(out, metrics['mode'], frames, table, threshold_m, places,
                           background, grid))
    metrics['outputs'] = {name: p.name for name, p in paths.items()}
    metrics['outputs']['metrics'] = 'metrics.json'
    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + '\n'
    paths['metrics'] = _atomic_text(out / 'metrics.json', text)
    return paths


def _draw(out: Path, mode: str, frames: Sequence[FrameResult], table: FrameTable,
          threshold_m: float, places, background, grid: list) -> Dict[str, Path]:
    """Draw the track, error-along-track, error CDF and retrieval grid pictures into `out`."""
    from taco_cvgl.evaluation.scoring import plots
    paths: Dict[str, Path] = {}

    def column(name):
        return np.array([getattr(f, name) for f in frames], dtype=float)

    truth_lat, truth_lon = column('truth_lat'), column('truth_lon')
    stamps = np.array([f.stamp_ns for f in frames], dtype=np.int64)
    time_s = (stamps - stamps.min()) * 1e-9 if len(stamps) else np.zeros(0)
    db_lat, db_lon = places if places is not None else (None, None)
    scored, fixes = table.scored, table.scored & table.fix
    est_lat = np.where(scored, column('est_lat'), np.nan)
    if mode != 'retrieval':     # a dataset's queries are no track in time
        paths['track_plot'] = plots.track_plot(
            out / 'track.png', truth_lat, truth_lon, est_lat, column('est_lon'), table.fix,
            table.error_m, threshold_m, db_lat, db_lon, background)
        paths['error_along_track_plot'] = plots.error_along_track_plot(
            out / 'error_along_track.png', time_s, table.error_m, table.fix, threshold_m)
    curves = [('all frames', table.error_m[scored]), ('fixes', table.error_m[fixes])]
    if mode == 'recorded':
        curves = curves[1:]  # every recorded estimate is a fix
    elif mode == 'retrieval':
        curves = [('top-1 database image', table.error_m[scored])]
    paths['error_cdf_plot'] = plots.error_cdf_plot(out / 'error_cdf.png', curves, threshold_m)
    if grid:
        paths['retrieval_grid_plot'] = plots.retrieval_grid_plot(
            out / 'retrieval_grid.png', grid,
            f'query | top-{GRID_CANDIDATES} retrieved (green: within {threshold_m:g} m of the '
            f'truth, red: beyond)')
    return paths


def _fmt(value, unit: str = '', digits: int = 1, percent: bool = False) -> str:
    """Return a number for the summary table ('n/a' for None)."""
    if value is None:
        return 'n/a'
    if percent:
        return f'{100.0 * value:.{digits}f} %'
    return f'{value:.{digits}f}{unit}'


def _recall_row(name: str, recall: Dict[str, Any]) -> Tuple[str, str]:
    """Return the summary row of a Recall@k block, for the k it holds."""
    if not recall['available']:
        return f'{name}@k', 'not available'
    ks = [key[3:] for key in recall if key.startswith('at_')]
    return (f'{name}@{"/".join(ks)} ({recall["threshold_m"]:g} m)',
            ' / '.join(_fmt(recall[f'at_{k}'], percent=True) for k in ks))


def format_summary(metrics: Dict[str, Any]) -> str:
    """Return a short human-readable table of the metrics."""
    frames, recall = metrics['frames'], metrics['recall']
    err_all, err_fix = metrics['position_error_m']['all'], metrics['position_error_m']['fixes']
    fixes, cal = metrics['fixes'], metrics['calibration']
    head, lat = metrics['heading_error_deg'], metrics['latency_s']
    state = 'complete' if metrics['complete'] else f'INCOMPLETE ({metrics.get("stopped") or ""}'\
        f'{", " if metrics.get("stopped") else ""}{frames.get("failed", 0)} failed frame(s))'
    rows = [('result', state),
            ('frames', f'{frames["scored"]} scored / {frames["total"]} '
                       f'({frames["no_ground_truth"]} without ground truth)')]
    if 'without_positive' in frames:
        rows.append(('queries apart', f'{frames["without_positive"]} without a database image '
                                      f'within {metrics["threshold_m"]:g} m'))
    rows.append(_recall_row('Recall', recall))
    if 'recall_all_queries' in metrics:
        rows.append(_recall_row('over all queries', metrics['recall_all_queries']))
    for name, stats in (('error, all (m)', err_all), ('error, fixes (m)', err_fix)):
        rows.append((name, f'median {_fmt(stats["median"])}  p90 {_fmt(stats["p90"])}  '
                           f'max {_fmt(stats["max"])}  (n={stats["count"]})'))
    rows.append(('fixes', 'not available' if fixes.get('unavailable') else
                 f'{fixes["count"]}, share {_fmt(fixes["share"], percent=True)}, '
                 f'precision {_fmt(fixes["precision"], percent=True)} '
                 f'(<= {fixes["threshold_m"]:g} m)'))
    if fixes.get('no_fix_reasons'):
        rows.append(('no fix', ', '.join(f'{n} {reason}'
                                         for reason, n in fixes['no_fix_reasons'].items())))
    checked = metrics.get('verification') or {}
    if checked.get('frames'):
        rows.append(('verified per frame', f'mean {_fmt(checked["candidates_per_frame_mean"])}  '
                                           f'max {checked["candidates_per_frame_max"]} places'))
    rows.append(('inside 1 / 2 sigma', f'{_fmt(cal["within_1sigma"], percent=True)} / '
                                       f'{_fmt(cal["within_2sigma"], percent=True)} (Gaussian '
                                       f'39.3 / 86.5 %), scale for 95 % in 2 sigma '
                                       f'{_fmt(cal["scale_for_95pct_within_2sigma"], digits=2)}'))
    rows.append(('heading error (deg)', f'median {_fmt(head.get("median"))}  p90 '
                                        f'{_fmt(head.get("p90"))}' if head['available']
                 else 'not available'))
    rows.append(('latency (ms)', f'median {_fmt(lat["median"] * 1e3)}  p90 '
                                 f'{_fmt(lat["p90"] * 1e3)}' if lat['available']
                 else 'not available'))
    width = max(len(name) for name, _ in rows)
    lines = [f'{name:<{width}}  {value}' for name, value in rows]
    lines += [f'warning: {w}' for w in metrics.get('warnings', [])]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `taco-cvgl evaluate`."""
    parser = argparse.ArgumentParser(
        prog='taco-cvgl evaluate', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--bag', type=Path,
                        help='rosbag2 (directory, .mcap or .db3; MCAP or sqlite3) to evaluate')
    parser.add_argument('--gt-topic',
                        help='ground-truth sensor_msgs/NavSatFix topic of the bag '
                             '(interpolated in time)')
    parser.add_argument('--gt-bag', type=Path,
                        help='read the ground truth from this bag instead of --bag')
    parser.add_argument('--image-topic',
                        help='camera topic (Image or CompressedImage): localize each image; '
                             'with --estimate-topic, only counted for the fix share')
    parser.add_argument('--estimate-topic',
                        help='score this recorded estimate topic (NavSatFix or '
                             'GeoPoseWithCovarianceStamped) instead of running the localizer')
    parser.add_argument('--db', type=Path, help='database built by build-db (needed to '
                        'localize; with --estimate-topic, drawn under the track)')
    parser.add_argument('--weights', type=Path, help='the weights that built the database')
    parser.add_argument('--out', type=Path, required=True,
                        help='folder for metrics.json, frames.csv and the plots')
    parser.add_argument('--threshold-m', type=float, default=25.0,
                        help='distance (m) within which a retrieved place counts as a hit '
                             '(default 25)')
    parser.add_argument('--fix-threshold-m', type=float,
                        help='distance (m) within which a fix counts as precise (default: '
                             '--threshold-m)')
    parser.add_argument('--max-gt-gap-s', type=float, default=1.0,
                        help='largest time (s) from a frame to the ground-truth fixes around '
                             'it; frames further away count as without ground truth '
                             '(default 1.0)')
    parser.add_argument('--gt-heading-topic',
                        help='ground-truth heading: geometry_msgs/QuaternionStamped or '
                             'sensor_msgs/Imu orientation (ENU); without it no heading error')
    parser.add_argument('--orientation-topic',
                        help='heading prior of the robot: sensor_msgs/Imu or '
                             'geometry_msgs/QuaternionStamped orientation (ENU), matched to '
                             'each image by time as the node does (default: orientation_topic '
                             'of --params-file; an empty string for none)')
    parser.add_argument('--camera-yaw-deg', type=float, default=0.0,
                        help='camera mounting yaw relative to the robot (deg, CCW positive)')
    parser.add_argument('--max-frames', type=int,
                        help='stop after this many images (the result is marked incomplete)')
    parser.add_argument('--grid-rows', type=int, default=6,
                        help='queries shown in the retrieval grid (0: no grid; default 6)')
    parser.add_argument('--map-image', type=Path,
                        help='image drawn under the track plot (north up), with --map-extent')
    parser.add_argument('--map-extent', type=float, nargs=4,
                        metavar=('WEST', 'EAST', 'SOUTH', 'NORTH'),
                        help='longitudes and latitudes (deg) of the --map-image edges')
    parser.add_argument('--no-plots', action='store_true',
                        help='write metrics.json and frames.csv only, no pictures')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    parser.add_argument('--recall-values', type=int, nargs='+', metavar='N',
                        help='the N of Recall@N (default 1 5 10; 1 5 10 20 on a dataset)')
    dataset = parser.add_argument_group(
        'dataset folders', 'score retrieval on a VPR dataset instead of a bag (needs --weights): '
        f'each side a folder of images named {VPR_NAME} (position from lat/lon, else UTM), or '
        'a CSV image_path,latitude,longitude[,heading] as build-db reads')
    dataset.add_argument('--database-folder', type=Path, metavar='DIR',
                         help='database images (relative --database-csv paths start here)')
    dataset.add_argument('--queries-folder', type=Path, metavar='DIR',
                         help='query images (relative --queries-csv paths start here)')
    dataset.add_argument('--database-csv', type=Path, metavar='FILE',
                         help='positions of the database images, instead of their file names')
    dataset.add_argument('--queries-csv', type=Path, metavar='FILE',
                         help='positions of the query images, instead of their file names')
    dataset.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
    add_settings_args(parser)
    return parser


def _background(image: Optional[Path], extent: Optional[Sequence[float]]):
    """Return the plots.MapBackground of --map-image/--map-extent, or None."""
    if image is None and extent is None:
        return None
    if image is None or extent is None:
        raise InputError('--map-image and --map-extent go together')
    from taco_cvgl.evaluation.plots import MapBackground
    from taco_cvgl.files.image_codec import load_image_file
    west, east, south, north = extent
    if not (west < east and south < north):
        raise InputError(f'--map-extent must be WEST EAST SOUTH NORTH with WEST < EAST and '
                         f'SOUTH < NORTH, got {extent}')
    return MapBackground(load_image_file(image), (west, east, south, north))


def _evaluate_dataset(args, progress: bool) -> EvaluationResult:
    """Run evaluate_folders with the flags (weights, device and precision as the node reads)."""
    bag_flags = [flag for flag, value in (('--bag', args.bag), ('--estimate-topic',
                                                                args.estimate_topic))
                 if value is not None]
    if bag_flags:
        raise InputError(f'{", ".join(bag_flags)} and the dataset folders are two different '
                         f'evaluations; give one')
    params = settings_from_args(args, args.weights, None)
    if not params.weights:
        raise InputError('evaluating a dataset needs --weights (the model that embeds both '
                         'sides)')
    return evaluate_folders(
        params.weights, args.out, args.database_folder, args.queries_folder,
        database_csv=args.database_csv, queries_csv=args.queries_csv,
        threshold_m=args.threshold_m,
        recall_values=args.recall_values or DEFAULT_RECALL_VALUES, device=params.device,
        precision=params.precision, batch_size=args.batch_size, grid_rows=args.grid_rows,
        progress=progress, plots=not args.no_plots)


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments, evaluate, print a summary; exit 0 complete, 1 incomplete, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    background = _background(args.map_image, args.map_extent)
    progress = not args.no_progress
    dataset = (args.database_folder, args.database_csv, args.queries_folder, args.queries_csv)
    if any(value is not None for value in dataset):
        result = _evaluate_dataset(args, progress)
    elif args.bag is None or args.gt_topic is None:
        raise InputError('give a bag with ground truth (--bag BAG --gt-topic TOPIC) or a '
                         'dataset (--database-folder DIR --queries-folder DIR)')
    elif args.estimate_topic:
        if args.orientation_topic:
            raise InputError('--orientation-topic feeds the localizer; a recorded bag '
                             '(--estimate-topic) is scored without running it')
        result = evaluate_recorded(
            args.bag, args.estimate_topic, args.gt_topic, args.out, gt_bag=args.gt_bag,
            image_topic=args.image_topic, gt_heading_topic=args.gt_heading_topic,
            threshold_m=args.threshold_m, fix_threshold_m=args.fix_threshold_m,
            max_gt_gap_s=args.max_gt_gap_s, db=args.db, background=background,
            progress=progress, plots=not args.no_plots)
    else:
        from taco_cvgl.localization.localizer import CVGLLocalizer
        params = settings_from_args(args, args.weights, args.db)
        missing = [flag for flag, value in (('--image-topic', args.image_topic),
                                            ('--db', params.database),
                                            ('--weights', params.weights)) if not value]
        if missing:
            raise InputError(f'evaluating a camera bag needs {", ".join(missing)} (or give '
                             f'--estimate-topic to score a bag recorded from the node)')
        result = evaluate_bag(
            args.bag, args.image_topic, args.gt_topic, params.database, params.weights,
            args.out, localizer=CVGLLocalizer.from_settings(params),
            gt_bag=args.gt_bag, gt_heading_topic=args.gt_heading_topic,
            threshold_m=args.threshold_m, fix_threshold_m=args.fix_threshold_m,
            max_gt_gap_s=args.max_gt_gap_s, camera_yaw_deg=args.camera_yaw_deg,
            max_frames=args.max_frames, grid_rows=args.grid_rows, background=background,
            progress=progress, plots=not args.no_plots,
            ks=_check_recall_values(args.recall_values or DEFAULT_KS),
            orientation_topic=params.orientation_topic if args.orientation_topic is None
            else args.orientation_topic, orientation_sigma_deg=params.orientation_sigma_deg,
            orientation_max_age_s=params.orientation_max_age_s)
    print(format_summary(result.metrics))
    print(f'wrote {result.paths["metrics"]} and {len(result.paths) - 1} more file(s) in '
          f'{args.out}')
    stopped = result.metrics.get('stopped') or ''
    if stopped.startswith('interrupted'):
        return 130
    if result.complete or stopped.startswith('stopped after max_frames'):
        return 0
    return 1


if __name__ == '__main__':
    sys.exit(main())
