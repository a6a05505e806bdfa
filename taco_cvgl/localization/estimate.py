"""
From the top-k retrieved database places to a pose estimate with a covariance and a confidence.

The estimate is built on what the retrieval says about itself:
- Each neighbour gets a weight w = exp((s - s_best) / T) from its cosine similarity s.
- Neighbours that lie within `consistency_radius_m` of one another vote for one place. The place
  with the largest share of the weight wins; that share is the confidence (1.0 when every strong
  match agrees, ~1/k when the matches scatter over the map, as they do for a wrong match).
- Position: the weighted mean of the winning cluster. Covariance (ENU, m^2): the weighted spread of
  the cluster plus a floor for the database's own grid (a retrieval cannot be more precise than the
  spacing of the places it can return), times a calibration scale. The scale is chosen on
  evaluation data so that ~95 % of errors fall inside the 2-sigma (Mahalanobis distance 2)
  ellipse (see `calibrate_scale`): for a true 2-D Gaussian that ellipse would hold 86.5 %, so
  this covariance is deliberately conservative, as a fix fused by an EKF should be.
- Heading: the circular weighted mean of the cluster's headings (with the camera's mounting yaw
  applied by the caller), and its circular variance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import from_enu, to_enu, wrap_degrees


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """Parameters of the pose estimate (distances in metres, angles in degrees)."""

    temperature: float = 0.03
    consistency_radius_m: Optional[float] = None  # default: 2.5 x database grid spacing
    sigma_floor_m: Optional[float] = None         # default: 0.5 x database grid spacing
    covariance_scale: float = 1.0
    min_confidence: float = 0.5
    altitude_fallback_m: float = 0.0
    altitude_sigma_m: float = 100.0                 # used when the database has no altitude
    heading_sigma_floor_deg: float = 5.0

    def __post_init__(self):
        """Refuse values that make no sense, naming the parameter."""
        checks = {
            'temperature': self.temperature > 0,
            'covariance_scale': self.covariance_scale > 0,
            'min_confidence': 0.0 <= self.min_confidence <= 1.0,
            'altitude_sigma_m': self.altitude_sigma_m > 0,
            'heading_sigma_floor_deg': self.heading_sigma_floor_deg >= 0,
            'consistency_radius_m': self.consistency_radius_m is None
            or self.consistency_radius_m > 0,
            'sigma_floor_m': self.sigma_floor_m is None or self.sigma_floor_m > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f'estimator parameter(s) out of range: '
                             f'{", ".join(f"{b}={getattr(self, b)}" for b in bad)}')


@dataclasses.dataclass
class PoseEstimate:
    """A position (WGS84 degrees, metres), its ENU covariance (m^2) and a heading (deg from N)."""

    latitude: float
    longitude: float
    altitude: float
    position_covariance: np.ndarray   # 3x3, ENU, m^2
    heading: float                    # degrees clockwise from north; NaN when unknown
    heading_variance: float           # rad^2; inf when unknown
    confidence: float                 # share of the retrieval weight behind this place, 0..1
    fix: bool
    cluster: np.ndarray               # indices (into the neighbour list) that voted for it


def _circular_mean(angles_deg: np.ndarray, weights: np.ndarray):
    rad = np.radians(angles_deg)
    c = float(np.sum(weights * np.cos(rad)) / np.sum(weights))
    s = float(np.sum(weights * np.sin(rad)) / np.sum(weights))
    resultant = min(1.0, math.hypot(c, s))
    mean = float(wrap_degrees(math.degrees(math.atan2(s, c))))
    variance = -2.0 * math.log(max(resultant, 1e-12))  # wrapped-normal variance, rad^2
    return mean, variance


def estimate_pose(latitude, longitude, altitude, heading, similarity,
                  grid_spacing_m: float, config: EstimatorConfig = EstimatorConfig(),
                  heading_offset_deg: float = 0.0) -> PoseEstimate:
    """
    Estimate a pose from k neighbours (arrays in order of decreasing similarity).

    heading_offset_deg is added to the neighbours' headings (e.g. the camera's mounting yaw,
    negated, to turn a camera heading into the robot's).
    """
    sim = np.asarray(similarity, dtype=float)
    k = len(sim)
    if k == 0:
        raise InputError('no neighbours to estimate a pose from')
    lat = np.asarray(latitude, dtype=float)
    lon = np.asarray(longitude, dtype=float)
    alt = np.asarray(altitude, dtype=float)
    hdg = np.asarray(heading, dtype=float)
    spacing = grid_spacing_m if math.isfinite(grid_spacing_m) and grid_spacing_m > 0 else 10.0
    radius = config.consistency_radius_m or 2.5 * spacing
    floor = config.sigma_floor_m or 0.5 * spacing

    weights = np.exp((sim - sim.max()) / config.temperature)
    enu = to_enu(lat[0], lon[0], lat, lon)
    dist = np.sqrt(((enu[:, None, :] - enu[None, :, :]) ** 2).sum(-1))
    member = dist <= radius
    mass = member.astype(float) @ weights
    anchor = int(np.argmax(mass - 1e-9 * np.arange(k)))  # ties go to the better match
    cluster = np.flatnonzero(member[anchor])
    w = weights[cluster] / weights[cluster].sum()
    confidence = float(mass[anchor] / weights.sum())

    centre = (w[:, None] * enu[cluster]).sum(axis=0)
    offsets = enu[cluster] - centre
    spread = (w[:, None, None] * offsets[:, :, None] * offsets[:, None, :]).sum(axis=0)
    horizontal = config.covariance_scale * (spread + floor ** 2 * np.eye(2))
    est_lat, est_lon = from_enu(lat[0], lon[0], centre[0], centre[1])

    known_alt = np.isfinite(alt[cluster])
    if known_alt.any():
        wa = w[known_alt] / w[known_alt].sum()
        est_alt = float((wa * alt[cluster][known_alt]).sum())
        alt_var = float((wa * (alt[cluster][known_alt] - est_alt) ** 2).sum()) + floor ** 2
    else:
        est_alt, alt_var = config.altitude_fallback_m, config.altitude_sigma_m ** 2
    covariance = np.zeros((3, 3))
    covariance[:2, :2] = horizontal
    covariance[2, 2] = config.covariance_scale * alt_var

    known_hdg = np.isfinite(hdg[cluster])
    if known_hdg.any():
        est_hdg, hdg_var = _circular_mean(hdg[cluster][known_hdg] + heading_offset_deg,
                                          w[known_hdg])
        hdg_var += math.radians(config.heading_sigma_floor_deg) ** 2
    else:
        est_hdg, hdg_var = math.nan, math.inf
    return PoseEstimate(latitude=float(est_lat), longitude=float(est_lon), altitude=est_alt,
                        position_covariance=covariance, heading=est_hdg,
                        heading_variance=hdg_var, confidence=confidence,
                        fix=confidence >= config.min_confidence, cluster=cluster)


def mahalanobis_sq(errors_en: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """Return e^T C^-1 e for each 2-D error (Nx2, metres) and 2x2 covariance (Nx2x2, m^2)."""
    errors_en = np.asarray(errors_en, dtype=float).reshape(-1, 2)
    cov = np.asarray(covariances, dtype=float).reshape(-1, 2, 2)
    solved = np.linalg.solve(cov, errors_en[:, :, None])[:, :, 0]
    return (errors_en * solved).sum(axis=1)


def calibrate_scale(errors_en: np.ndarray, covariances: np.ndarray, target: float = 0.95,
                    sigmas: float = 2.0) -> float:
    """
    Return the factor to multiply covariances by so `target` of errors fall within `sigmas`.

    The result multiplies `EstimatorConfig.covariance_scale` (a covariance already scaled by c
    is passed in as is, and the returned factor is relative to it).
    """
    d2 = mahalanobis_sq(errors_en, covariances)
    if len(d2) == 0:
        raise InputError('no errors to calibrate the covariance on')
    return float(np.quantile(d2, target) / sigmas ** 2)
