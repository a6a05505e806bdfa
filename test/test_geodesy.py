"""Known-answer tests of the geodesy helpers on surveyed points."""

import math

import numpy as np
import pytest
from taco_cvgl.geo import geodesy


def dms(d, m, s):
    sign = -1 if d < 0 else 1
    return sign * (abs(d) + m / 60 + s / 3600)


# Flinders Peak -> Buninyong, Victoria: the geodetic survey marks of Vincenty's 1975 paper and of
# Geoscience Australia's worked example: 54 972.271 m, forward azimuth 306 deg 52' 05.37".
FLINDERS = (dms(-37, 57, 3.72030), dms(144, 25, 29.52440))
BUNINYONG = (dms(-37, 39, 10.15610), dms(143, 55, 35.38390))


def test_geodesic_distance_and_azimuth_known_answer():
    az, dist = geodesy.azimuth_distance(*FLINDERS, *BUNINYONG)
    assert float(dist) == pytest.approx(54972.271, abs=0.002)
    assert float(az) % 360 == pytest.approx(dms(306, 52, 5.37), abs=0.5 / 3600)
    assert float(geodesy.distance_m(*FLINDERS, *BUNINYONG)) == pytest.approx(54972.271, abs=0.002)


def test_enu_round_trip_and_axes():
    east_north = geodesy.to_enu(*FLINDERS, [BUNINYONG[0]], [BUNINYONG[1]])[0]
    # Buninyong lies north-west of Flinders Peak.
    assert east_north[0] < 0 < east_north[1]
    assert math.hypot(*east_north) == pytest.approx(54972.271, abs=0.002)
    lat, lon = geodesy.from_enu(*FLINDERS, east_north[0], east_north[1])
    assert geodesy.distance_m(lat, lon, *BUNINYONG) < 1e-3
    # One kilometre north of the equator on the prime meridian is 1/110.574 deg of latitude.
    lat, lon = geodesy.from_enu(0.0, 0.0, 0.0, 1000.0)
    assert float(lat) == pytest.approx(1000 / 110574.0, rel=1e-4)
    assert float(lon) == pytest.approx(0.0, abs=1e-12)


def test_heading_conventions():
    # Compass north is ENU yaw +90 deg, east is yaw 0, west is yaw 180.
    assert geodesy.heading_to_enu_yaw(0.0) == pytest.approx(math.pi / 2)
    assert geodesy.heading_to_enu_yaw(90.0) == pytest.approx(0.0)
    assert abs(geodesy.heading_to_enu_yaw(270.0)) == pytest.approx(math.pi)
    for heading in (0.0, 45.0, 181.0, 359.5):
        yaw = geodesy.heading_to_enu_yaw(heading)
        assert geodesy.enu_yaw_to_heading(yaw) == pytest.approx(heading)
    x, y, z, w = geodesy.yaw_to_quaternion(math.pi / 2)
    assert (x, y) == (0.0, 0.0) and z == pytest.approx(w) == pytest.approx(math.sqrt(0.5))
    assert np.allclose(geodesy.angle_difference_deg([350, 10], [10, 350]), [-20, 20])
