"""
A constant-velocity track over the localizer's own verified fixes: the motion prior.

A camera does not jump: between two frames the robot moves at most as far as its speed allows.
The track is a linear Kalman filter on (east, north, v_east, v_north) in the map's local ENU
frame, updated only with geometrically verified fixes (each with its own covariance) and driven
by white acceleration noise between them. Its prediction at a frame's time says where to look:
the localizer verifies the database places inside the prediction's gate even when the image's
embedding did not rank them, and ranks candidates by similarity combined with the prediction.

What it is not: a navigation filter for the robot. Its prediction is never published as a fix
(a downstream estimator such as robot_localization fuses the published fixes with odometry); it
only decides which places to check and in which order to rank them. A verified fix far outside
the prediction restarts the track there (the robot was moved, or the track had drifted), and a
track without a verified fix for `max_age_s` stops predicting.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.localization.heading import prior_from_track

# Squared Mahalanobis distance of a 2-D innovation beyond which a verified fix restarts the
# track: the chi-square (2 dof) quantile at 1 - 1e-5.
RESTART_MAHALANOBIS_SQ = 23.0


@dataclasses.dataclass(frozen=True)
class TrackConfig:
    """How the platform may move between verified fixes."""

    accel_sigma_mps2: float = 1.0     # white acceleration noise (manoeuvres, turns)
    speed_sigma_mps: float = 10.0     # speed uncertainty when a track starts
    max_age_s: float = 30.0           # stop predicting this long after the last verified fix
    # A frame this much older than the last fix is taken as simultaneous with it: cameras of
    # one robot deliver slightly out of order. Further back, time ran backwards (a bag
    # started again) and the track stops predicting.
    reorder_tolerance_s: float = 0.5

    def __post_init__(self):
        """Refuse values that make no sense, naming the setting."""
        for name in ('accel_sigma_mps2', 'speed_sigma_mps', 'max_age_s', 'reorder_tolerance_s'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f'track: {name} must be a finite number >= 0, got {value}')


class ConstantVelocityTrack:
    """Kalman filter on (east, north, v_east, v_north), metres and metres per second."""

    def __init__(self, config: TrackConfig = TrackConfig()):
        """Start without a track: predict() returns None until the first update()."""
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the track."""
        self.state: Optional[np.ndarray] = None
        self.covariance: Optional[np.ndarray] = None
        self.stamp: Optional[float] = None
        self.updates = 0
        self.restarts = 0
        self.heading: Optional[Tuple[Optional[float], float, float]] = None

    def remember_heading(self, stamp: Optional[float], heading_deg: float,
                         sigma_deg: float) -> None:
        """Keep the heading of a verified fix (degrees from north, 1-sigma in degrees)."""
        if math.isfinite(heading_deg) and math.isfinite(sigma_deg):
            self.heading = (None if stamp is None else float(stamp), float(heading_deg),
                            float(sigma_deg))

    def heading_prior(self, stamp: Optional[float], rate_sigma_dps: float):
        """
        Return the last verified heading as a HeadingPrior at `stamp`, or None.

        Its sigma grows by rate_sigma_dps per second since that fix (how fast the platform
        turns); None without a remembered heading, a time, a positive rate, or past max_age_s.
        """
        if self.heading is None or stamp is None or self.heading[0] is None or \
                not rate_sigma_dps > 0:
            return None
        dt = float(stamp) - self.heading[0]
        if -self.config.reorder_tolerance_s <= dt < 0.0:
            dt = 0.0
        if not 0.0 <= dt <= self.config.max_age_s:
            return None
        return prior_from_track(self.heading[1], self.heading[2], dt, rate_sigma_dps)

    @property
    def active(self) -> bool:
        """Return whether a track exists (it may still be too old to predict)."""
        return self.state is not None

    def _propagate(self, dt: float) -> Tuple[np.ndarray, np.ndarray]:
        f = np.eye(4)
        f[0, 2] = f[1, 3] = dt
        g = np.array([[dt * dt / 2, 0.0], [0.0, dt * dt / 2], [dt, 0.0], [0.0, dt]])
        q = g @ g.T * self.config.accel_sigma_mps2 ** 2
        return f @ self.state, f @ self.covariance @ f.T + q

    def predict(self, stamp: Optional[float]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """
        Return (position (2,), covariance (2, 2)) expected at `stamp`, or None.

        None when there is no track, no time, the track is older than max_age_s, or the time
        runs backwards by more than reorder_tolerance_s (a bag started again): nothing is known
        about where to look then.
        """
        dt = self._elapsed(stamp)
        if dt is None:
            return None
        state, covariance = self._propagate(dt)
        return state[:2].copy(), covariance[:2, :2].copy()

    def _elapsed(self, stamp: Optional[float]) -> Optional[float]:
        """Return the seconds from the last fix to `stamp` (0 for a slightly older frame)."""
        if self.state is None or stamp is None or self.stamp is None:
            return None
        dt = float(stamp) - self.stamp
        if -self.config.reorder_tolerance_s <= dt < 0.0:
            dt = 0.0
        if not 0.0 <= dt <= self.config.max_age_s:
            return None
        return dt

    def update(self, stamp: Optional[float], position: np.ndarray,
               covariance: np.ndarray) -> bool:
        """
        Fuse a verified fix (east, north) with its 2x2 covariance; return True if it restarted.

        The track restarts at the fix when there is none, when the fix has no time or comes
        from the past, when the last fix is too old, or when the fix is implausibly far from the
        prediction (squared Mahalanobis distance above RESTART_MAHALANOBIS_SQ).
        """
        z = np.asarray(position, dtype=float).reshape(2)
        r = np.asarray(covariance, dtype=float).reshape(2, 2)
        dt = self._elapsed(stamp)
        if dt is None:
            self._start(stamp, z, r)
            return True
        state, cov = self._propagate(dt)
        innovation = z - state[:2]
        s = cov[:2, :2] + r
        if float(innovation @ np.linalg.solve(s, innovation)) > RESTART_MAHALANOBIS_SQ:
            if self.updates == 1 and dt > 0:
                # Faster than speed_sigma_mps allowed for: the second fix measures the velocity
                # (two-point start). Were it a wrong fix, the third one restarts the track.
                self._start_moving(stamp, z, r, dt)
                return False
            self._start(stamp, z, r)
            self.restarts += 1
            return True
        gain = cov[:, :2] @ np.linalg.inv(s)
        self.state = state + gain @ innovation
        joseph_h = np.eye(4) - np.hstack([gain, np.zeros((4, 2))])
        self.covariance = joseph_h @ cov @ joseph_h.T + gain @ r @ gain.T
        self.stamp += dt   # a slightly older frame does not move the track's time back
        self.updates += 1
        return False

    def _start_moving(self, stamp, z: np.ndarray, r: np.ndarray, dt: float) -> None:
        first, first_cov = self.state[:2].copy(), self.covariance[:2, :2].copy()
        self.state = np.concatenate([z, (z - first) / dt])
        self.covariance = np.block([[r, r / dt], [r / dt, (r + first_cov) / dt ** 2]])
        self.stamp = float(stamp)
        self.updates = 2

    def _start(self, stamp, z: np.ndarray, r: np.ndarray) -> None:
        speed_var = self.config.speed_sigma_mps ** 2
        self.state = np.array([z[0], z[1], 0.0, 0.0])
        self.covariance = np.zeros((4, 4))
        self.covariance[:2, :2] = r
        self.covariance[2, 2] = self.covariance[3, 3] = speed_var
        self.stamp = None if stamp is None else float(stamp)
        self.updates = 1
