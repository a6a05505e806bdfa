"""The output messages built from a Measurement: fields, frames, covariance layout, units."""

import math
import os

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import NavSatFix, NavSatStatus
from taco_cvgl.localization.localizer import Measurement
from taco_cvgl.ros import messages

STAMP = Time(sec=1_700_000_000, nanosec=123_456_789)
# ENU covariance with distinct entries, so a transposition or a N/E swap shows: east sigma 2 m,
# north sigma 3 m, east-north covariance 1.5 m^2, up sigma 4 m.
ENU_COVARIANCE = np.array([[4.0, 1.5, 0.0], [1.5, 9.0, 0.0], [0.0, 0.0, 16.0]])


def measurement(fix=True, altitude=512.0, heading=30.0, heading_variance=0.01):
    """Return a Measurement at a known place (Pampas, Argentina: south and west)."""
    return Measurement(timestamp=1.7e9, fix=fix, latitude=-34.6037, longitude=-58.3816,
                       altitude=altitude, heading=heading, heading_variance=heading_variance,
                       position_covariance=ENU_COVARIANCE.copy(), confidence=0.9, matches=[])


def geographic():
    """Return GeoPoseWithCovarianceStamped, skipping where geographic_msgs is not built."""
    msg_type = messages.geopose_type()
    if msg_type is None:
        if os.environ.get('TACO_REQUIRE_GEOGRAPHIC_MSGS'):
            pytest.fail('geographic_msgs is required (TACO_REQUIRE_GEOGRAPHIC_MSGS) but missing')
        pytest.skip('geographic_msgs is not built here (scripts/build_interfaces.sh)')
    return msg_type


def roundtrip(msg):
    """Serialize and deserialize a message (what a subscriber in another process gets)."""
    return deserialize_message(serialize_message(msg), type(msg))


def test_navsat_fix_is_what_navsat_transform_accepts():
    """A fix: status FIX, service set, stamp and frame, ENU covariance row-major, APPROXIMATED."""
    msg = roundtrip(messages.navsat_fix(measurement(), STAMP, 'base_link'))
    assert msg.header.stamp == STAMP and msg.header.frame_id == 'base_link'
    assert msg.status.status == NavSatStatus.STATUS_FIX
    assert msg.status.service == NavSatStatus.SERVICE_GPS
    assert (msg.latitude, msg.longitude, msg.altitude) == (-34.6037, -58.3816, 512.0)
    assert msg.position_covariance_type == NavSatFix.COVARIANCE_TYPE_APPROXIMATED
    # Row-major ENU: [0] east variance, [1] east-north, [4] north variance, [8] up variance.
    assert list(msg.position_covariance) == [4.0, 1.5, 0.0, 1.5, 9.0, 0.0, 0.0, 0.0, 16.0]


def test_fix_without_altitude_gets_the_fallback_never_nan():
    """navsat_transform drops a NaN altitude: the fallback and its variance replace it."""
    msg = messages.navsat_fix(measurement(altitude=math.nan), STAMP, 'gps', 42.0, 50.0)
    assert msg.altitude == 42.0
    cov = np.reshape(msg.position_covariance, (3, 3))
    assert cov[2, 2] == 2500.0 and not cov[2, :2].any() and not cov[:2, 2].any()
    assert np.array_equal(cov[:2, :2], ENU_COVARIANCE[:2, :2])


def test_no_fix_carries_no_position():
    """Below the threshold (when published at all): NO_FIX, NaN position, UNKNOWN covariance."""
    msg = roundtrip(messages.navsat_fix(measurement(fix=False), STAMP, 'base_link'))
    assert msg.status.status == NavSatStatus.STATUS_NO_FIX
    assert math.isnan(msg.latitude) and math.isnan(msg.longitude) and math.isnan(msg.altitude)
    assert msg.position_covariance_type == NavSatFix.COVARIANCE_TYPE_UNKNOWN


@pytest.mark.parametrize('heading, yaw_deg', [
    (0.0, 90.0),     # north is +90 deg from east, counter-clockwise
    (90.0, 0.0),     # east
    (180.0, -90.0),  # south
    (270.0, 180.0),  # west
    (30.0, 60.0),
])
def test_geopose_orientation_is_enu_yaw_of_the_compass_heading(heading, yaw_deg):
    """Heading (clockwise from north) becomes a rotation about Up, counter-clockwise from east."""
    msg_type = geographic()
    msg = roundtrip(messages.geopose(measurement(heading=heading), STAMP, 'base_link', msg_type))
    q = msg.pose.pose.orientation
    assert (q.x, q.y) == (0.0, 0.0)
    assert q.z ** 2 + q.w ** 2 == pytest.approx(1.0)
    got = math.degrees(2.0 * math.atan2(q.z, q.w))
    assert (got - yaw_deg + 180.0) % 360.0 - 180.0 == pytest.approx(0.0, abs=1e-9)


def test_geopose_position_and_covariance_layout():
    """6x6 row-major: ENU position block in m^2, roll/pitch unknown, yaw from heading_variance."""
    msg_type = geographic()
    msg = roundtrip(messages.geopose(measurement(heading_variance=0.02), STAMP, 'body',
                                     msg_type))
    assert msg.header.stamp == STAMP and msg.header.frame_id == 'body'
    p = msg.pose.pose.position
    assert (p.latitude, p.longitude, p.altitude) == (-34.6037, -58.3816, 512.0)
    cov = np.reshape(msg.pose.covariance, (6, 6))
    # The message's axis order is (lat, lon, alt): north, east, up.
    assert cov[0, 0] == 9.0 and cov[1, 1] == 4.0 and cov[2, 2] == 16.0
    assert cov[0, 1] == cov[1, 0] == 1.5 and not cov[:2, 2].any()
    assert cov[3, 3] == cov[4, 4] == messages.UNKNOWN_ANGLE_VARIANCE
    assert cov[5, 5] == 0.02
    off_diagonal = cov - np.diag(np.diag(cov))
    assert not off_diagonal[3:].any() and not off_diagonal[:, 3:].any()


def test_geopose_without_heading_has_identity_orientation_and_unknown_yaw():
    """A database without headings: identity quaternion, yaw variance as large as roll's."""
    msg_type = geographic()
    msg = messages.geopose(measurement(heading=math.nan, heading_variance=math.inf), STAMP,
                           'base_link', msg_type)
    q = msg.pose.pose.orientation
    assert (q.x, q.y, q.z, q.w) == (0.0, 0.0, 0.0, 1.0)
    assert msg.pose.covariance[35] == messages.UNKNOWN_ANGLE_VARIANCE
    assert all(math.isfinite(v) for v in msg.pose.covariance)


def test_diagnostic_array_holds_one_status_with_text_values():
    """Values become strings (floats with 3 decimals); level, name and hardware id are kept."""
    msg = roundtrip(messages.diagnostic_array(
        STAMP, 'cvgl_node: localization', 'cuda:0', DiagnosticStatus.WARN, 'no images',
        {'input_rate_hz': 29.97, 'bad_messages': 3, 'device': 'cuda:0'}))
    assert isinstance(msg, DiagnosticArray) and msg.header.stamp == STAMP
    status, = msg.status
    assert (status.level, status.name, status.hardware_id, status.message) == (
        DiagnosticStatus.WARN, 'cvgl_node: localization', 'cuda:0', 'no images')
    assert {kv.key: kv.value for kv in status.values} == {
        'input_rate_hz': '29.970', 'bad_messages': '3', 'device': 'cuda:0'}
