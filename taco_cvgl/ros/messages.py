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
- Imu (optional): the same ENU yaw and yaw variance, orientation only (see heading_imu).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from sensor_msgs.msg import Imu, NavSatFix, NavSatStatus
from taco_cvgl.geo.geodesy import heading_to_enu_yaw, yaw_to_quaternion

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
    covariance[5, 5] = yaw_variance(heading_variance)
    return covariance


def yaw_variance(heading_variance: float) -> float:
    """Return the yaw variance to publish (rad^2): UNKNOWN_ANGLE_VARIANCE at most, or if NaN."""
    if not math.isfinite(heading_variance):
        return UNKNOWN_ANGLE_VARIANCE
    return min(heading_variance, UNKNOWN_ANGLE_VARIANCE)


def enu_orientation(measurement) -> Tuple[Tuple[float, float, float, float], float]:
    """
    Return the (x, y, z, w) quaternion of a measurement's ENU yaw and the yaw's variance.

    The heading (degrees clockwise from north) becomes a yaw counter-clockwise from east; an
    unknown heading gives the identity with UNKNOWN_ANGLE_VARIANCE.
    """
    if not math.isfinite(measurement.heading):
        return (0.0, 0.0, 0.0, 1.0), UNKNOWN_ANGLE_VARIANCE
    quaternion = yaw_to_quaternion(heading_to_enu_yaw(measurement.heading))
    return tuple(float(v) for v in quaternion), yaw_variance(measurement.heading_variance)


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
    q = msg.pose.pose.orientation
    (q.x, q.y, q.z, q.w), variance = enu_orientation(measurement)
    covariance = geopose_covariance(np.reshape(fix.position_covariance, (3, 3)), variance)
    msg.pose.covariance = [float(v) for v in covariance.reshape(-1)]
    return msg


def heading_imu(measurement, stamp, frame_id: str) -> Optional[Imu]:
    """
    Return an orientation-only Imu of a fix's heading; None without a fix or a heading.

    For robot_localization (navsat_transform's imu input, or an EKF fusing yaw only): roll and
    pitch get UNKNOWN_ANGLE_VARIANCE, and -1 in element 0 of the angular velocity and linear
    acceleration covariances marks those fields absent, as sensor_msgs/Imu defines.
    """
    if not measurement.fix or not math.isfinite(measurement.heading):
        return None
    msg = Imu()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    q = msg.orientation
    (q.x, q.y, q.z, q.w), variance = enu_orientation(measurement)
    msg.orientation_covariance = [float(v) for v in np.diag(
        [UNKNOWN_ANGLE_VARIANCE, UNKNOWN_ANGLE_VARIANCE, variance]).reshape(-1)]
    msg.angular_velocity_covariance[0] = -1.0
    msg.linear_acceleration_covariance[0] = -1.0
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
