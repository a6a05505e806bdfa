"""
Orientation input: the robot's heading from an IMU, compass or autopilot topic, matched by time.

The node (`orientation_topic`) and the bag evaluation (`--orientation-topic`) both turn each
orientation message into a `HeadingPrior` with `message_prior`, keep them in an
`OrientationBuffer` by stamp, and ask it for the prior of each image's stamp. A message that
holds no usable heading is refused with a reason, never an exception: its frames are localized
without a prior.

Conventions: stamps are integer nanoseconds; orientations are quaternions (x, y, z, w) of the
robot relative to ENU (REP-103; REP-145 asks it of an IMU), so ENU yaw pi/2 faces north, heading
0. Headings are degrees clockwise from true north, sigmas 1-sigma degrees. No ROS import here:
messages are read by field name, so rclpy's and rosbags' classes both work.
"""

from __future__ import annotations

import bisect
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import angle_difference_deg, wrap_degrees
from taco_cvgl.localization.heading import HeadingPrior, quaternion_heading

#: orientation_type -> the ROS message type read.
MESSAGE_TYPES = {'imu': 'sensor_msgs/msg/Imu', 'quaternion': 'geometry_msgs/msg/QuaternionStamped'}
# A yaw sigma wider than this (degrees) says nothing of the heading: such a message is refused
# (the largest orientation_sigma_deg; this node publishes a variance of 1e6 rad^2 for none).
MAX_SIGMA_DEG = 180.0
DEFAULT_MAX_SAMPLES = 2000   # a 200 Hz IMU over 10 s
Matched = Tuple[Optional[HeadingPrior], str]   # (prior or None, '' or why there is none)


def _prior(quaternion: Sequence[float], sigma_deg: float) -> Matched:
    """Return the prior of an ENU quaternion (x, y, z, w), or None and why it holds none."""
    try:
        return HeadingPrior(quaternion_heading(*quaternion), float(sigma_deg)), ''
    except (InputError, TypeError, ValueError) as exc:
        return None, str(exc)


def quaternion_prior(quaternion: Sequence[float], default_sigma_deg: float) -> Matched:
    """Return the prior of a geometry_msgs/QuaternionStamped's quaternion: it has no sigma."""
    return _prior(quaternion, default_sigma_deg)


def imu_prior(quaternion: Sequence[float], covariance: Sequence[float],
              default_sigma_deg: float) -> Matched:
    """
    Return the prior of a sensor_msgs/Imu's orientation and orientation_covariance.

    The covariance is 3x3 row-major (rad^2) about the fixed x, y, z axes: element 8 is the yaw
    variance. All zeros means unknown (sensor_msgs/Imu): default_sigma_deg; so does a zero yaw
    variance beside other non-zero entries (a driver that does not estimate yaw uncertainty).
    Element 0 at -1 means the Imu has no orientation: refused, as are a yaw sigma beyond
    MAX_SIGMA_DEG, a negative or non-finite variance and a NaN or zero quaternion.
    """
    cov = np.asarray(covariance, dtype=float).reshape(-1)
    if cov.size != 9:
        return None, f'orientation_covariance has {cov.size} elements, expected 9'
    if cov[0] == -1.0:
        return None, 'the Imu carries no orientation (orientation_covariance[0] is -1)'
    variance = float(cov[8])
    if not math.isfinite(variance) or variance < 0:
        return None, (f'yaw variance orientation_covariance[8] = {variance!r} rad^2 is not a '
                      f'variance')
    if variance == 0:
        return _prior(quaternion, default_sigma_deg)
    sigma = math.degrees(math.sqrt(variance))
    if sigma > MAX_SIGMA_DEG:
        return None, (f'yaw sigma {sigma:.0f} deg (variance {variance:g} rad^2) says nothing '
                      f'about the heading')
    return _prior(quaternion, sigma)


def message_prior(msg, kind: str, default_sigma_deg: float) -> Matched:
    """Return the prior of an orientation message of `kind` ('imu' or 'quaternion')."""
    try:
        if kind == 'imu':
            q = msg.orientation
            return imu_prior((q.x, q.y, q.z, q.w), msg.orientation_covariance, default_sigma_deg)
        if kind == 'quaternion':
            q = msg.quaternion
            return quaternion_prior((q.x, q.y, q.z, q.w), default_sigma_deg)
    except AttributeError as exc:
        return None, f'not a {MESSAGE_TYPES[kind]} message: {exc}'
    raise InputError(f'orientation_type must be one of {", ".join(MESSAGE_TYPES)}, got {kind!r}')


class OrientationBuffer:
    """
    The newest heading priors by stamp (ns), at most max_samples of them; not thread-safe.

    Samples are kept sorted by stamp whatever order they come in; beyond max_samples the oldest
    stamp goes. A sample at a stamp already held replaces it.
    """

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES):
        """Hold at most max_samples (>= 1) samples."""
        if int(max_samples) < 1:
            raise InputError(f'an orientation buffer holds >= 1 sample, got {max_samples}')
        self.max_samples = int(max_samples)
        self._stamps: list = []
        self._priors: list = []

    def __len__(self) -> int:
        """Return the number of samples held."""
        return len(self._stamps)

    def add(self, stamp_ns: int, prior: HeadingPrior) -> None:
        """Keep a prior at its stamp, dropping the oldest sample when the buffer is full."""
        stamp = int(stamp_ns)
        i = bisect.bisect_left(self._stamps, stamp)
        if i < len(self._stamps) and self._stamps[i] == stamp:
            self._priors[i] = prior
            return
        self._stamps.insert(i, stamp)
        self._priors.insert(i, prior)
        if len(self._stamps) > self.max_samples:
            del self._stamps[0], self._priors[0]

    def newest_ns(self) -> Optional[int]:
        """Return the latest stamp held (ns), or None before the first sample."""
        return self._stamps[-1] if self._stamps else None

    def prior_at(self, stamp_ns: int, max_age_s: float) -> Matched:
        """
        Return the prior at a stamp, or None and why there is none.

        With a sample within max_age_s on each side the heading is interpolated on the circle
        (the shorter way round) and the sigma is the larger of the two; with one, that sample.
        """
        if not self._stamps:
            return None, 'no orientation message received'
        stamp, limit = int(stamp_ns), float(max_age_s) * 1e9
        i = bisect.bisect_left(self._stamps, stamp)
        if i < len(self._stamps) and self._stamps[i] == stamp:
            return self._priors[i], ''
        near = [j for j in (i - 1, i) if 0 <= j < len(self._stamps)
                and abs(self._stamps[j] - stamp) <= limit]
        if len(near) == 2:
            return self._between(near[0], near[1], stamp), ''
        if near:
            return self._priors[near[0]], ''
        gap = min(abs(self._stamps[j] - stamp) for j in (i - 1, i) if 0 <= j < len(self._stamps))
        return None, (f'the nearest orientation message is {gap * 1e-9:.3f} s from the image '
                      f'(orientation_max_age_s {max_age_s:g})')

    def _between(self, before: int, after: int, stamp: int) -> HeadingPrior:
        """Return the prior interpolated between two samples around a stamp."""
        t0, t1 = self._stamps[before], self._stamps[after]
        p0, p1 = self._priors[before], self._priors[after]
        fraction = (stamp - t0) / (t1 - t0)
        turn = float(angle_difference_deg(p1.heading_deg, p0.heading_deg))
        heading = float(wrap_degrees(p0.heading_deg + fraction * turn))
        return HeadingPrior(heading, max(p0.sigma_deg, p1.sigma_deg), source=p0.source)
