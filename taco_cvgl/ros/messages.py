"""
Build the node's output messages from a core `Measurement`: pure functions, no node needed.

Conventions:
- NavSatFix.position_covariance is the Measurement's 3x3 ENU covariance (east, north, up; m^2),
  row-major, marked COVARIANCE_TYPE_APPROXIMATED: the form robot_localization's navsat_transform
  reads. A fix always carries a finite altitude (navsat_transform drops NaN altitudes).
- GeoPoseWithCovarianceStamped: orientation in the local ENU frame (yaw counter-clockwise from
  east, REP-103), from the compass heading (clockwise from north). Its 6x6 covariance, row-major,
  is ordered (x, y, z, rotation about x, y, z) with x east, y north, z up in m^2 and rotations in
  rad^2, as consumers such as Autoware's geo_pose_projector read it (they copy it into a
  map-frame PoseWithCovariance). Roll and pitch are not observed: they get UNKNOWN_ANGLE_VARIANCE,
  and so does yaw when the database holds no headings.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from sensor_msgs.msg import NavSatFix, NavSatStatus
from taco_cvgl.geodesy import heading_to_enu_yaw, yaw_to_quaternion

# Variance (rad^2) of an angle the node does not observe: far beyond (2 pi)^2, so any filter
# fusing the message gives the angle no weight.
UNKNOWN_ANGLE_VARIANCE = 1.0e6


def geopose_type() -> Optional[type]:
    """Return geographic_msgs' GeoPoseWithCovarianceStamped, or None where it is not installed."""
    try:
        from geographic_msgs.msg import GeoPoseWithCovarianceStamped
    except ImportError:
        return None
    return GeoPoseWithCovarianceStamped


def navsat_fix(measurement, stamp, frame_id: str, altitude_fallback_m: float = 0.0,
               altitude_sigma_m: float = 100.0) -> NavSatFix:
    """
    Return the NavSatFix of a measurement, stamped with the image's time.

    A measurement without a fix (confidence below the threshold) gives status NO_FIX with a NaN
    position and COVARIANCE_TYPE_UNKNOWN: there is no position to use. With a fix, an altitude
    the measurement lacks is replaced by altitude_fallback_m with variance altitude_sigma_m^2.
    """
    msg = NavSatFix()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    # No GNSS service fits a position retrieved from a GPS-tagged map; GPS names where the map's
    # positions come from. navsat_transform reads only the status.
    msg.status.service = NavSatStatus.SERVICE_GPS
    if not measurement.fix:
        msg.status.status = NavSatStatus.STATUS_NO_FIX
        msg.latitude = msg.longitude = msg.altitude = math.nan
        msg.position_covariance_type = NavSatFix.COVARIANCE_TYPE_UNKNOWN
        return msg
    msg.status.status = NavSatStatus.STATUS_FIX
    msg.latitude = float(measurement.latitude)
    msg.longitude = float(measurement.longitude)
    covariance = np.array(measurement.position_covariance, dtype=float).reshape(3, 3)
    if math.isfinite(measurement.altitude):
        msg.altitude = float(measurement.altitude)
    else:
        msg.altitude = float(altitude_fallback_m)
        covariance[2, :] = covariance[:, 2] = 0.0
        covariance[2, 2] = altitude_sigma_m ** 2
    msg.position_covariance = [float(v) for v in covariance.reshape(-1)]
    msg.position_covariance_type = NavSatFix.COVARIANCE_TYPE_APPROXIMATED
    return msg


# ENU (east, north, up) -> the (latitude, longitude, altitude) axis order of GeoPoseWithCovariance.
ENU_TO_LAT_LON_ALT = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def geopose_covariance(position_covariance, heading_variance: float) -> np.ndarray:
    """
    Return the 6x6 covariance of a GeoPoseWithCovariance from an ENU position covariance.

    The message defines its parameters as (lat, lon, alt, rotation about X, Y, Z): the position
    block is in metres^2 along north, east and up (in that order), the rotations in rad^2 about
    the fixed east, north and up axes.
    """
    covariance = np.zeros((6, 6))
    enu = np.asarray(position_covariance, dtype=float).reshape(3, 3)
    covariance[:3, :3] = ENU_TO_LAT_LON_ALT @ enu @ ENU_TO_LAT_LON_ALT.T
    covariance[3, 3] = covariance[4, 4] = UNKNOWN_ANGLE_VARIANCE
    known = math.isfinite(heading_variance)
    covariance[5, 5] = min(heading_variance, UNKNOWN_ANGLE_VARIANCE) if known \
        else UNKNOWN_ANGLE_VARIANCE
    return covariance


def geopose(measurement, stamp, frame_id: str, msg_type, altitude_fallback_m: float = 0.0,
            altitude_sigma_m: float = 100.0):
    """
    Return a GeoPoseWithCovarianceStamped (msg_type) of a measurement with a fix.

    The heading (degrees clockwise from north) becomes an ENU yaw quaternion; an unknown
    heading gives the identity orientation with UNKNOWN_ANGLE_VARIANCE on yaw.
    """
    fix = navsat_fix(measurement, stamp, frame_id, altitude_fallback_m, altitude_sigma_m)
    msg = msg_type()
    msg.header = fix.header
    msg.pose.pose.position.latitude = fix.latitude
    msg.pose.pose.position.longitude = fix.longitude
    msg.pose.pose.position.altitude = fix.altitude
    heading_known = math.isfinite(measurement.heading)
    yaw = heading_to_enu_yaw(measurement.heading) if heading_known else 0.0
    q = msg.pose.pose.orientation
    q.x, q.y, q.z, q.w = yaw_to_quaternion(yaw)
    variance = measurement.heading_variance if heading_known else math.inf
    covariance = geopose_covariance(np.reshape(fix.position_covariance, (3, 3)), variance)
    msg.pose.covariance = [float(v) for v in covariance.reshape(-1)]
    return msg


def diagnostic_array(stamp, name: str, hardware_id: str, level: bytes, message: str,
                     values: Mapping[str, Any]) -> DiagnosticArray:
    """
    Return a DiagnosticArray with one status; values are written as key/value strings.

    Floats are written with 3 decimals; level is one of DiagnosticStatus.OK / WARN / ERROR.
    """
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id)
    for key, value in values.items():
        text = f'{value:.3f}' if isinstance(value, float) else str(value)
        status.values.append(KeyValue(key=key, value=text))
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = [status]
    return array
