"""The motion prior's constant-velocity track, against hand-computed answers."""

import numpy as np
import pytest
from taco_cvgl.errors import InputError
from taco_cvgl.localization.tracking import ConstantVelocityTrack, TrackConfig

FIX_COV = np.eye(2) * 10.0 ** 2   # a verified fix: 10 m, 1 sigma


def straight_track(config=TrackConfig(accel_sigma_mps2=0.1, max_age_s=60.0)):
    """Return a track fed fixes of a platform going north-east at (30, 40) m/s, every 5 s."""
    track = ConstantVelocityTrack(config)
    for t in range(0, 30, 5):
        track.update(float(t), np.array([30.0 * t, 40.0 * t]), FIX_COV)
    return track


def test_no_track_no_prediction():
    track = ConstantVelocityTrack()
    assert track.predict(0.0) is None
    assert track.update(3.0, np.array([1.0, 2.0]), FIX_COV)   # the first fix starts a track
    mean, cov = track.predict(3.0)
    assert np.allclose(mean, [1.0, 2.0]) and np.allclose(cov, FIX_COV)


def test_constant_velocity_is_extrapolated():
    track = straight_track()
    mean, cov = track.predict(45.0)           # 20 s after the last fix at t = 25 s
    assert np.allclose(mean, [30 * 45, 40 * 45], atol=5.0)
    assert np.allclose(track.state[2:], [30.0, 40.0], atol=0.5)
    # The prediction grows less certain with time, never more.
    sigma = [np.sqrt(np.trace(track.predict(t)[1]) / 2) for t in (25.0, 35.0, 45.0, 60.0)]
    assert all(a < b for a, b in zip(sigma, sigma[1:]))
    assert sigma[0] < 10.0     # six fixes of 10 m average down


def test_acceleration_noise_sets_how_fast_the_prediction_spreads():
    calm = ConstantVelocityTrack(TrackConfig(accel_sigma_mps2=0.1))
    agile = ConstantVelocityTrack(TrackConfig(accel_sigma_mps2=3.0))
    for track in (calm, agile):
        track.update(0.0, np.zeros(2), FIX_COV)
        track.update(5.0, np.array([50.0, 0.0]), FIX_COV)
    # Position variance from white acceleration alone over dt: sigma_a^2 dt^4 / 4 (per axis).
    grow_calm = calm.predict(25.0)[1][0, 0] - calm.predict(5.0)[1][0, 0]
    grow_agile = agile.predict(25.0)[1][0, 0] - agile.predict(5.0)[1][0, 0]
    assert grow_agile > 20 * grow_calm
    assert grow_agile > 3.0 ** 2 * 20.0 ** 4 / 4


def test_old_or_backwards_time_gives_no_prediction():
    track = straight_track(TrackConfig(max_age_s=30.0))
    assert track.predict(25.0 + 30.0) is not None
    assert track.predict(25.0 + 30.5) is None       # too long without a verified fix
    assert track.predict(20.0) is None              # time ran backwards (a bag restarted)
    assert track.predict(None) is None
    # A fix after the track went stale starts a new one there.
    assert track.update(100.0, np.array([5.0, 5.0]), FIX_COV)
    assert np.allclose(track.predict(100.0)[0], [5.0, 5.0])


def test_a_frame_slightly_older_than_the_last_fix_keeps_the_track():
    # Several cameras: the frame of one is 0.1 s older than the fix just made from another's.
    track = straight_track()
    last, velocity = track.state[:2].copy(), track.state[2:].copy()
    mean, cov = track.predict(25.0 - 0.1)
    assert np.allclose(mean, last) and np.allclose(cov, track.covariance[:2, :2])
    assert not track.update(25.0 - 0.1, last + np.array([-3.0, -4.0]), FIX_COV)
    assert track.restarts == 0 and track.stamp == 25.0     # the track's time never goes back
    assert np.allclose(track.state[2:], velocity, atol=0.5)
    # Beyond the tolerance, time ran backwards: no prediction, and a fix restarts the track.
    assert track.predict(25.0 - 0.6) is None
    assert track.update(25.0 - 0.6, last, FIX_COV) and np.allclose(track.state[2:], 0.0)


def test_a_fast_platform_gets_its_velocity_from_the_second_fix():
    # 50 m/s with speed_sigma_mps 10: the second fix is 5 sigma off a standing start.
    track = straight_track(TrackConfig(accel_sigma_mps2=0.1, speed_sigma_mps=10.0))
    assert track.restarts == 0 and track.updates == 6
    assert np.allclose(track.state[2:], [30.0, 40.0], atol=0.5)


def test_an_implausible_fix_restarts_the_track():
    track = straight_track()
    before = track.restarts
    # 5 s later the platform cannot be 3 km away from where it was heading.
    assert track.update(30.0, np.array([3000.0, -2000.0]), FIX_COV)
    assert track.restarts == before + 1
    assert np.allclose(track.predict(30.0)[0], [3000.0, -2000.0])
    assert np.allclose(track.state[2:], 0.0)
    # A plausible fix does not.
    track = straight_track()
    assert not track.update(30.0, np.array([30.0 * 30 + 20, 40.0 * 30 - 15]), FIX_COV)


@pytest.mark.parametrize('name', ['accel_sigma_mps2', 'speed_sigma_mps', 'max_age_s',
                                  'reorder_tolerance_s'])
def test_bad_settings_are_named(name):
    with pytest.raises(InputError, match=name):
        TrackConfig(**{name: -1.0})
    with pytest.raises(InputError, match=name):
        TrackConfig(**{name: float('nan')})
