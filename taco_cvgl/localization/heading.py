"""
Heading priors: what the robot knows of its heading before the image is matched.

A `HeadingPrior` is the robot's heading (degrees clockwise from true north) with its 1-sigma
uncertainty, from a compass, an IMU or the autopilot (node: `orientation_topic`; bags: the same
topic; `taco-cvgl localize --heading-deg`), or from the localizer's own last verified fix.

For a downward camera the map tiles are north-up, so a query rotated north-up by the prior
(`north_up`) looks like its tile and the embedding ranks it far better; geometric verification
then only accepts rotations that agree with the prior (`rotation_agrees`). Without a prior the
query is embedded at several rotations (`tta_angles`) and each map entry keeps its best
similarity.

Angles: heading h of the image top (clockwise from north); a camera mounted at yaw y
(counter-clockwise, REP-103) on a robot heading H looks along h = H - y.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import cv2
import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import angle_difference_deg, enu_yaw_to_heading


@dataclasses.dataclass(frozen=True)
class HeadingPrior:
    """The robot's heading (degrees clockwise from north) and its 1-sigma error (degrees)."""

    heading_deg: float
    sigma_deg: float
    source: str = 'given'     # 'given' (topic, flag) or 'track' (the last verified fix)

    def __post_init__(self):
        """Refuse a heading that is not a finite number or a sigma that is not positive."""
        if not math.isfinite(self.heading_deg):
            raise InputError(f'heading prior: heading {self.heading_deg!r} is not finite')
        if not (math.isfinite(self.sigma_deg) and self.sigma_deg > 0):
            raise InputError(f'heading prior: sigma {self.sigma_deg!r} must be a positive '
                             f'finite number of degrees')

    def camera_heading(self, camera_yaw_deg: float = 0.0) -> float:
        """Return the heading of the image top of a camera mounted at this yaw."""
        return float(np.mod(self.heading_deg - camera_yaw_deg, 360.0))


def quaternion_yaw(x: float, y: float, z: float, w: float) -> float:
    """
    Return the ENU yaw (radians, counter-clockwise from east) of an orientation quaternion.

    Raises InputError for a quaternion that is not finite or has (nearly) zero norm: it holds
    no orientation at all.
    """
    values = (float(x), float(y), float(z), float(w))
    if not all(math.isfinite(v) for v in values):
        raise InputError(f'orientation quaternion {values} is not finite')
    norm = math.sqrt(sum(v * v for v in values))
    if norm < 1e-6:
        raise InputError('orientation quaternion has zero norm')
    x, y, z, w = (v / norm for v in values)
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def quaternion_heading(x: float, y: float, z: float, w: float) -> float:
    """Return the compass heading in [0, 360) degrees of an ENU orientation quaternion."""
    return enu_yaw_to_heading(quaternion_yaw(x, y, z, w))


def north_up(image: np.ndarray, camera_heading_deg: float) -> np.ndarray:
    """
    Return a downward camera's image turned so that its top points north.

    The image top points along camera_heading_deg (clockwise from north), so its content is
    turned clockwise by that angle about the image centre, size kept; the corners that the
    turn uncovers are filled by mirroring the image (no black wedges for the network to see).
    A camera heading of 0 returns the image as it is: a query that is already north-up embeds
    exactly as the map image it was cut from.
    """
    angle = float(camera_heading_deg)
    if abs(angle_difference_deg(angle, 0.0)) < 1e-6:
        return image
    h, w = image.shape[:2]
    # cv2's positive angle turns the content counter-clockwise: clockwise is negative.
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), -angle, 1.0)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def tta_angles(count: int) -> np.ndarray:
    """Return the `count` camera headings (degrees) tried without a prior: 0, 360/count, ..."""
    if int(count) < 1:
        raise InputError(f'rotation_tta must be >= 1, got {count}')
    return np.arange(int(count)) * (360.0 / int(count))


def rotation_agrees(rotation_deg: float, expected_deg: float, sigma_deg: float,
                    gate_sigmas: float, floor_deg: float = 5.0) -> bool:
    """
    Return whether a verified rotation lies within the prior's gate around the expected one.

    The gate is gate_sigmas x sigma, at least floor_deg (verification's own heading error).
    """
    gate = max(float(gate_sigmas) * float(sigma_deg), float(floor_deg))
    return abs(float(angle_difference_deg(rotation_deg, expected_deg))) <= gate


def merge_rotations(indices: Sequence[np.ndarray], sims: Sequence[np.ndarray], k: int):
    """
    Merge the searches of several rotations of one query: best similarity per entry, top k.

    indices/sims: one (k',) array per rotation, best first. Returns (indices, sims, rotation)
    of the k best entries, rotation being the position in the inputs that gave each its best.
    """
    best = {}
    for r, (found, found_sims) in enumerate(zip(indices, sims)):
        for j, s in zip(np.asarray(found).tolist(), np.asarray(found_sims).tolist()):
            if j >= 0 and (j not in best or s > best[j][0]):
                best[j] = (s, r)
    order = sorted(best, key=lambda j: -best[j][0])[:int(k)]
    return (np.array(order, np.int64), np.array([best[j][0] for j in order], np.float32),
            np.array([best[j][1] for j in order], np.int64))


def prior_from_track(heading_deg: float, heading_sigma_deg: float, age_s: float,
                     rate_sigma_dps: float) -> Optional[HeadingPrior]:
    """Return the prior the last verified heading gives after age_s (None without one)."""
    if not math.isfinite(heading_deg) or not math.isfinite(age_s) or age_s < 0:
        return None
    sigma = math.hypot(float(heading_sigma_deg), float(rate_sigma_dps) * float(age_s))
    return HeadingPrior(float(heading_deg), max(sigma, 1e-3), source='track')
