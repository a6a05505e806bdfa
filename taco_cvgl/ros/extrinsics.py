"""
Camera extrinsics from TF (use_tf): each camera's mounting yaw and lever arm on the robot.

Conventions (REP-103):
- tf_base_frame (base_link) is the robot's body: x forward, y left, z up.
- An image's header.frame_id is the camera's optical frame: z along the optical axis (out of the
  lens), x to the right of the image, y down the image. The "up" direction of the image, its
  top row, is therefore -y of the optical frame.
- The transform looked up is tf_base_frame -> frame_id: the camera's pose in the body frame,
  rotation R (its columns are the optical axes written in body coordinates) and translation t
  (the lens centre in body coordinates, metres): the lever arm.
- The mounting yaw is what camera_yaws_deg holds: the angle, counter-clockwise seen from above
  from the body's x axis, of the direction the localizer calls the camera's heading, projected
  onto the body's horizontal plane. For a nadir camera (camera_model nadir, the map's tiles are
  north-up) that direction is the image's up, -y optical: yaw = atan2(-R[1,1], -R[0,1]). For a
  forward camera (camera_model forward) it is the optical axis, +z optical: yaw = atan2(R[1,2],
  R[0,2]). A direction within about 6 degrees of vertical has no yaw: the transform is refused.
  Example: a camera looking straight down with the image's top towards the robot's left has the
  rotation quaternion (x, y, z, w) = (1, 0, 0, 0), a yaw of +90 deg.
- A fix of a camera is the position of that camera; the position of the body is the camera's
  minus the horizontal lever arm turned by the robot's heading into east/north (see to_base).

Transforms come from tf2_ros (Buffer and TransformListener) where it is installed, as on a
robot; elsewhere from TfListener below, which keeps the newest transform of each frame from
/tf_static (transient local) and /tf and composes the chain between two frames. Both use the
newest transforms: camera mounts are static, and a transform that moves is read as it is when
the frame is localized.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Dict, Sequence, Tuple

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import from_enu, heading_to_enu_yaw

# Smallest horizontal part (unit vector) of the camera's heading direction: sin(~5.7 deg).
MIN_HORIZONTAL = 0.1
# Longest chain of frames followed (a loop in the published tree must not hang the worker).
MAX_CHAIN = 100


@dataclasses.dataclass(frozen=True)
class Mount:
    """A camera's mounting: yaw (deg, CCW from body x), lever arm (m, x forward, y left)."""

    yaw_deg: float
    lever_xy: Tuple[float, float] = (0.0, 0.0)


def quaternion_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Return the 3x3 rotation of a quaternion (normalised; InputError if not finite or 0)."""
    q = np.array([x, y, z, w], dtype=float)
    norm = float(np.linalg.norm(q))
    if not np.all(np.isfinite(q)) or norm < 1e-9:
        raise InputError(f'rotation quaternion {tuple(q.tolist())} is not a rotation')
    x, y, z, w = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def mounting_yaw_deg(rotation_xyzw: Sequence[float], camera_model: str = 'nadir') -> float:
    """
    Return the mounting yaw (deg, CCW from body x, in (-180, 180]) of an optical frame.

    rotation_xyzw: the rotation of the transform body -> optical frame. nadir: the image's up
    (-y optical) gives the yaw; forward: the optical axis (+z). InputError when that direction
    is (nearly) vertical: such a camera has no yaw to take.
    """
    rotation = quaternion_matrix(*rotation_xyzw)
    direction = -rotation[:, 1] if camera_model == 'nadir' else rotation[:, 2]
    what = "the image's up (-y)" if camera_model == 'nadir' else 'the optical axis (+z)'
    if math.hypot(direction[0], direction[1]) < MIN_HORIZONTAL:
        raise InputError(f'{what} of the optical frame is (nearly) vertical in the body frame: '
                         f'no yaw for a {camera_model} camera (is the frame an optical one?)')
    return math.degrees(math.atan2(direction[1], direction[0]))


def mount_of(translation_xyz: Sequence[float], rotation_xyzw: Sequence[float],
             camera_model: str = 'nadir') -> Mount:
    """Return the Mount of a transform body -> optical frame (see mounting_yaw_deg)."""
    return Mount(mounting_yaw_deg(rotation_xyzw, camera_model),
                 (float(translation_xyz[0]), float(translation_xyz[1])))


def lever_enu(lever_xy: Sequence[float], heading_deg: float) -> Tuple[float, float]:
    """Return the body lever arm (x forward, y left; m) as (east, north) m at a compass heading."""
    yaw = heading_to_enu_yaw(heading_deg)
    x, y = lever_xy
    return (x * math.cos(yaw) - y * math.sin(yaw), x * math.sin(yaw) + y * math.cos(yaw))


def to_base(measurement, lever_xy: Sequence[float]):
    """
    Return the measurement of the camera moved to the body frame's origin (a new Measurement).

    The body is at the camera's position minus the lever arm turned by the measured heading.
    Without a heading the direction is unknown: the position stays the camera's and the
    horizontal variances grow by the lever arm's length squared (the body lies that far away).
    """
    lever_m = math.hypot(*lever_xy)
    if lever_m == 0.0 or not math.isfinite(measurement.latitude):
        return measurement
    if not math.isfinite(measurement.heading):
        covariance = np.array(measurement.position_covariance, dtype=float)
        covariance[0, 0] += lever_m ** 2
        covariance[1, 1] += lever_m ** 2
        return dataclasses.replace(measurement, position_covariance=covariance)
    east, north = lever_enu(lever_xy, measurement.heading)
    lat, lon = from_enu(measurement.latitude, measurement.longitude, -east, -north)
    return dataclasses.replace(measurement, latitude=float(lat), longitude=float(lon))


def transform_matrix(translation_xyz: Sequence[float], rotation_xyzw: Sequence[float]):
    """Return the 4x4 homogeneous matrix of a transform (parent <- child)."""
    matrix = np.eye(4)
    matrix[:3, :3] = quaternion_matrix(*rotation_xyzw)
    matrix[:3, 3] = translation_xyz
    return matrix


def matrix_quaternion(rotation: np.ndarray) -> Tuple[float, float, float, float]:
    """Return the (x, y, z, w) quaternion of a 3x3 rotation matrix (w >= 0)."""
    r = rotation
    w = math.sqrt(max(0.0, 1.0 + r[0, 0] + r[1, 1] + r[2, 2])) / 2.0
    x = math.copysign(math.sqrt(max(0.0, 1.0 + r[0, 0] - r[1, 1] - r[2, 2])) / 2.0,
                      r[2, 1] - r[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1.0 - r[0, 0] + r[1, 1] - r[2, 2])) / 2.0,
                      r[0, 2] - r[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1.0 - r[0, 0] - r[1, 1] + r[2, 2])) / 2.0,
                      r[1, 0] - r[0, 1])
    return (x, y, z, w)


class TransformTree:
    """
    The newest transform of each child frame, and the chain between two frames (no ROS).

    add(parent, child, translation, rotation) keeps one parent per child, as a TF tree has;
    lookup(target, source) returns the pose of source in target as (translation, quaternion).
    Thread-safe: the executor adds, the worker looks up.
    """

    def __init__(self):
        """Start with no transforms."""
        self._lock = threading.Lock()
        self._parents: Dict[str, Tuple[str, np.ndarray]] = {}

    def add(self, parent: str, child: str, translation_xyz, rotation_xyzw) -> None:
        """Keep the transform parent <- child (the newest one wins)."""
        matrix = transform_matrix(translation_xyz, rotation_xyzw)
        with self._lock:
            self._parents[child.lstrip('/')] = (parent.lstrip('/'), matrix)

    def _to_root(self, frame: str) -> Tuple[str, np.ndarray]:
        """Return (root frame, root <- frame) by following the parents."""
        matrix, seen = np.eye(4), 0
        while frame in self._parents:
            parent, step = self._parents[frame]
            matrix, frame, seen = step @ matrix, parent, seen + 1
            if seen > MAX_CHAIN:
                raise LookupError(f'the transforms above {frame} form a loop')
        return frame, matrix

    def lookup(self, target: str, source: str):
        """Return source's pose in target: ((x, y, z), (qx, qy, qz, qw)); LookupError if none."""
        with self._lock:
            target_root, root_target = self._to_root(target.lstrip('/'))
            source_root, root_source = self._to_root(source.lstrip('/'))
        if target_root != source_root:
            raise LookupError(f'no chain of transforms joins {target} and {source}')
        matrix = np.linalg.inv(root_target) @ root_source
        return tuple(matrix[:3, 3].tolist()), matrix_quaternion(matrix[:3, :3])


class TfSource:
    """
    Transforms between frames, from tf2_ros where installed, else from /tf_static and /tf.

    The fallback subscribes as tf2_ros does: /tf_static reliable and transient local (a late
    subscriber still gets the static transforms), /tf reliable, both 100 deep.
    """

    def __init__(self, node):
        """Listen on node (its executor delivers the transforms); InputError without TF types."""
        self._node, self._subscriptions = node, []
        try:
            import tf2_ros
        except ImportError:
            tf2_ros = None
        if tf2_ros is not None:
            self.kind = 'tf2_ros'
            self._buffer = tf2_ros.Buffer()
            self._listener = tf2_ros.TransformListener(self._buffer, node)
            self._errors = (tf2_ros.TransformException,)
            return
        self.kind, self._listener, self._errors = 'own listener', None, (LookupError,)
        self._tree = TransformTree()
        self._subscribe()

    def _subscribe(self) -> None:
        """Subscribe to /tf_static and /tf (the fallback without tf2_ros)."""
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        try:
            from tf2_msgs.msg import TFMessage
        except ImportError:
            raise InputError('parameter use_tf: neither tf2_ros nor tf2_msgs is installed '
                             '(install ros-$ROS_DISTRO-tf2-ros)') from None
        for topic, durability in (('/tf_static', DurabilityPolicy.TRANSIENT_LOCAL),
                                  ('/tf', DurabilityPolicy.VOLATILE)):
            qos = QoSProfile(depth=100, durability=durability,
                             reliability=ReliabilityPolicy.RELIABLE)
            self._subscriptions.append(self._node.create_subscription(
                TFMessage, topic, self._on_transforms, qos))

    def _on_transforms(self, msg) -> None:
        """Keep each transform of a TFMessage (a malformed one is skipped)."""
        for stamped in msg.transforms:
            t, r = stamped.transform.translation, stamped.transform.rotation
            try:
                self._tree.add(stamped.header.frame_id, stamped.child_frame_id,
                               (t.x, t.y, t.z), (r.x, r.y, r.z, r.w))
            except InputError:
                continue

    def lookup(self, target: str, source: str):
        """Return source's newest pose in target as (translation, quaternion); LookupError."""
        if self._listener is None:
            return self._tree.lookup(target, source)
        from rclpy.time import Time
        try:
            stamped = self._buffer.lookup_transform(target, source, Time())
        except self._errors as exc:
            raise LookupError(str(exc)) from None
        t, r = stamped.transform.translation, stamped.transform.rotation
        return (t.x, t.y, t.z), (r.x, r.y, r.z, r.w)

    def close(self) -> None:
        """Stop listening."""
        if self._listener is not None and hasattr(self._listener, 'unregister'):
            self._listener.unregister()
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions = []


class CameraMounts:
    """
    Each camera's Mount: from TF (base_frame -> the image's frame_id) once it is available.

    Until then, and whenever the lookup fails, a camera gets its camera_yaws_deg value and no
    lever arm; the node logs that once per camera, and once when TF gives its mount.
    """

    def __init__(self, node, base_frame: str, camera_model: str, topics: Sequence[str]):
        """Listen to TF on node for the cameras of topics (in image_topics order)."""
        self._node, self._base, self._model, self._topics = node, base_frame, camera_model, topics
        self._source = TfSource(node)
        self._state: Dict[int, str] = {}   # camera index -> 'fallback' or 'tf' (what was logged)

    def mounts(self, frames: Sequence[Tuple[int, str]], fallback_yaws: Sequence[float]):
        """Return the Mount of each (camera index, image frame_id)."""
        return [self._mount(index, frame_id, fallback_yaws[index]) for index, frame_id in frames]

    def _mount(self, index: int, frame_id: str, fallback_yaw: float) -> Mount:
        """Return one camera's Mount from TF, or the fallback (logged once)."""
        try:
            if not frame_id:
                raise LookupError('its images have no header.frame_id')
            translation, rotation = self._source.lookup(self._base, frame_id)
            mount = mount_of(translation, rotation, self._model)
        except (LookupError, InputError) as exc:
            if self._state.get(index) != 'fallback':
                self._state[index] = 'fallback'
                self._node.get_logger().warning(
                    f'{self._topics[index]}: no camera mount from TF ({self._base} -> '
                    f'{frame_id or "?"}: {exc}); using camera_yaws_deg {fallback_yaw} and no '
                    f'lever arm until there is one')
            return Mount(fallback_yaw)
        if self._state.get(index) != 'tf':
            self._state[index] = 'tf'
            self._node.get_logger().info(
                f'{self._topics[index]}: camera mount from TF ({self._source.kind}, '
                f'{self._base} -> {frame_id}): yaw {mount.yaw_deg:.2f} deg, lever arm '
                f'x {mount.lever_xy[0]:.3f} m, y {mount.lever_xy[1]:.3f} m')
        return mount

    def close(self) -> None:
        """Stop listening to TF."""
        self._source.close()
