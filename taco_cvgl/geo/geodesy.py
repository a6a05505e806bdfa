"""
Geodesy on the WGS84 ellipsoid through pyproj, and the heading conventions used everywhere.

Conventions:
- latitude/longitude in degrees (WGS84), altitude in metres above the ellipsoid where known.
- Local frame: ENU (x east, y north, z up) in metres, tangent at a reference point. Offsets are
  geodesic: a point at distance d and azimuth a from the reference maps to (d sin a, d cos a),
  exact in distance and direction from the reference (azimuthal equidistant), so metre-level
  covariances stay right over the tens of kilometres a database spans.
- heading: degrees clockwise from true north in [0, 360) (compass convention, as in the database
  CSV). ENU yaw: radians counter-clockwise from east = pi/2 - heading (REP-103).
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from pyproj import Geod

WGS84 = Geod(ellps='WGS84')


def distance_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Return the geodesic distance in metres between points (arrays broadcast)."""
    lat1, lon1, lat2, lon2 = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                                   for v in (lat1, lon1, lat2, lon2)))
    _, _, dist = WGS84.inv(lon1, lat1, lon2, lat2)
    return np.asarray(dist, dtype=float)


def azimuth_distance(lat0, lon0, lat, lon) -> Tuple[np.ndarray, np.ndarray]:
    """Return (forward azimuth in degrees clockwise from north, distance in metres)."""
    lat0, lon0, lat, lon = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                                 for v in (lat0, lon0, lat, lon)))
    az, _, dist = WGS84.inv(lon0, lat0, lon, lat)
    return np.asarray(az, dtype=float), np.asarray(dist, dtype=float)


def to_enu(lat0: float, lon0: float, lat, lon) -> np.ndarray:
    """Return Nx2 (east, north) metres of points relative to the reference (lat0, lon0)."""
    az, dist = azimuth_distance(lat0, lon0, lat, lon)
    az = np.radians(az)
    return np.stack([dist * np.sin(az), dist * np.cos(az)], axis=-1)


def from_enu(lat0: float, lon0: float, east, north) -> Tuple[np.ndarray, np.ndarray]:
    """Return (lat, lon) of points given as (east, north) metres from the reference."""
    east, north = np.broadcast_arrays(np.asarray(east, float), np.asarray(north, float))
    dist = np.hypot(east, north)
    az = np.degrees(np.arctan2(east, north))
    lon, lat, _ = WGS84.fwd(np.full_like(dist, lon0), np.full_like(dist, lat0), az, dist)
    return np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)


def wrap_degrees(angle) -> np.ndarray:
    """Wrap angles in degrees into [0, 360) (a tiny negative angle gives 0, not 360)."""
    wrapped = np.mod(np.asarray(angle, dtype=float), 360.0)
    return np.where(wrapped >= 360.0, 0.0, wrapped)


def angle_difference_deg(a, b) -> np.ndarray:
    """Return the signed smallest difference a - b in degrees, in [-180, 180)."""
    return np.mod(np.asarray(a, float) - np.asarray(b, float) + 180.0, 360.0) - 180.0


def heading_to_enu_yaw(heading_deg: float) -> float:
    """Convert a compass heading (deg, clockwise from north) to ENU yaw (rad, CCW from east)."""
    yaw = math.radians(90.0 - float(heading_deg))
    return math.atan2(math.sin(yaw), math.cos(yaw))


def enu_yaw_to_heading(yaw_rad: float) -> float:
    """Convert ENU yaw (rad, CCW from east) to a compass heading in [0, 360) degrees."""
    return float(wrap_degrees(90.0 - math.degrees(yaw_rad)))


def yaw_to_quaternion(yaw_rad: float) -> Tuple[float, float, float, float]:
    """Return the (x, y, z, w) quaternion of a rotation by yaw about the up axis."""
    return (0.0, 0.0, math.sin(yaw_rad / 2.0), math.cos(yaw_rad / 2.0))
