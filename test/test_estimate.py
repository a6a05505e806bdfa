"""The pose-and-covariance estimate on hand-computable neighbour sets."""

import math

import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import from_enu, to_enu
from taco_cvgl.localization.estimate import (calibrate_scale, estimate_pose, EstimatorConfig,
                                             mahalanobis_sq)

LAT0, LON0 = 47.3769, 8.5417  # Zurich


def places(east_north):
    east_north = np.asarray(east_north, dtype=float)
    return from_enu(LAT0, LON0, east_north[:, 0], east_north[:, 1])


def test_agreeing_neighbours_give_weighted_mean_and_spread():
    lat, lon = places([[0, 0], [20, 0]])
    nan = np.full(2, np.nan)
    config = EstimatorConfig(temperature=1.0, sigma_floor_m=5.0, consistency_radius_m=50.0)
    pose = estimate_pose(lat, lon, nan, nan, [0.9, 0.9], grid_spacing_m=20.0, config=config)
    # Equal similarity -> equal weights -> the midpoint, spread 10 m along east.
    east, north = to_enu(LAT0, LON0, pose.latitude, pose.longitude)
    assert east == pytest.approx(10.0, abs=1e-6) and north == pytest.approx(0.0, abs=1e-6)
    cov = pose.position_covariance
    assert cov[0, 0] == pytest.approx(100.0 + 25.0, rel=1e-6)
    assert cov[1, 1] == pytest.approx(25.0, rel=1e-6)
    assert cov[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert pose.confidence == pytest.approx(1.0) and pose.fix
    # No altitude in the database: fallback altitude with a large variance, never NaN.
    assert pose.altitude == 0.0 and cov[2, 2] == pytest.approx(100.0 ** 2)


def test_scattered_neighbours_have_low_confidence_and_no_fix():
    lat, lon = places([[0, 0], [5000, 0], [0, 7000], [-6000, -3000]])
    nan = np.full(4, np.nan)
    pose = estimate_pose(lat, lon, nan, nan, [0.80, 0.79, 0.79, 0.78], grid_spacing_m=50.0,
                         config=EstimatorConfig(temperature=0.03, min_confidence=0.5))
    weights = np.exp((np.array([0.80, 0.79, 0.79, 0.78]) - 0.80) / 0.03)
    assert pose.confidence == pytest.approx(weights[0] / weights.sum())
    assert not pose.fix


def test_cluster_beats_a_lone_best_match():
    # The best match is alone; the next three agree on another place: the cluster wins.
    lat, lon = places([[3000, 3000], [0, 0], [10, 0], [0, 10]])
    nan = np.full(4, np.nan)
    pose = estimate_pose(lat, lon, nan, nan, [0.90, 0.89, 0.89, 0.89], grid_spacing_m=10.0,
                         config=EstimatorConfig(temperature=0.05))
    assert sorted(pose.cluster.tolist()) == [1, 2, 3]
    east, north = to_enu(LAT0, LON0, pose.latitude, pose.longitude)
    assert math.hypot(east, north) < 10.0
    assert pose.confidence > 0.7


def test_heading_circular_mean_with_camera_offset():
    lat, lon = places([[0, 0], [1, 0]])
    alt = np.array([400.0, 410.0])
    pose = estimate_pose(lat, lon, alt, [350.0, 10.0], [0.9, 0.9], grid_spacing_m=10.0,
                         config=EstimatorConfig(heading_sigma_floor_deg=0.0),
                         heading_offset_deg=90.0)
    assert pose.heading == pytest.approx(90.0, abs=1e-6)
    # Wrapped-normal variance of two headings 20 deg apart: -2 ln cos(10 deg).
    assert pose.heading_variance == pytest.approx(-2 * math.log(math.cos(math.radians(10))))
    assert pose.altitude == pytest.approx(405.0)


def test_calibration_scale_puts_the_target_share_inside_two_sigma():
    rng = np.random.default_rng(0)
    true_sigma = 30.0
    errors = rng.normal(0, true_sigma, size=(4000, 2))
    claimed = np.tile(np.eye(2) * 10.0 ** 2, (4000, 1, 1))  # overconfident by 3x in sigma
    scale = calibrate_scale(errors, claimed, target=0.95)
    inside = mahalanobis_sq(errors, claimed * scale) <= 4.0
    assert inside.mean() == pytest.approx(0.95, abs=0.005)
    # For Gaussian errors, 95 % within Mahalanobis 2 needs sigma^2 * chi2_2(0.95) / 4.
    assert scale * 100.0 == pytest.approx(true_sigma ** 2 * 5.991 / 4, rel=0.1)


def test_bad_parameters_are_refused_by_name():
    with pytest.raises(InputError, match='temperature'):
        EstimatorConfig(temperature=0.0)
    with pytest.raises(InputError, match='min_confidence'):
        EstimatorConfig(min_confidence=1.5)
    with pytest.raises(InputError, match='no neighbours'):
        estimate_pose([], [], [], [], [], grid_spacing_m=10.0)
