"""
Heading priors from orientation input: converters, time matching, node, bag evaluation, CLI.

Expected values are computed by hand: an ENU orientation of yaw pi/2 faces north (heading 0),
yaw 0 faces east (heading 90); a yaw variance of (0.1 rad)^2 is a sigma of 5.730 degrees.
"""

import json
import math
import time

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import QuaternionStamped
import numpy as np
import pytest
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Imu, NavSatFix
from taco_cvgl.cli import evaluate, localize
from taco_cvgl.evaluation import runs
from taco_cvgl.files import bags
from taco_cvgl.files.image_codec import encode_compressed
from taco_cvgl.geo.geodesy import angle_difference_deg
from taco_cvgl.localization.heading import HeadingPrior
from taco_cvgl.localization.localizer import CVGLLocalizer, LocalizerConfig
from taco_cvgl.localization.orientation import (imu_prior, message_prior, OrientationBuffer,
                                                quaternion_prior)
from test_node import (diagnostics_of, Listener, log_of, new_domain, process_env, start_node,
                       START_TIMEOUT_S, stop, with_stamp)

S = math.sqrt(0.5)
NORTH = (0.0, 0.0, S, S)       # ENU yaw +pi/2: heading 0
EAST = (0.0, 0.0, 0.0, 1.0)    # yaw 0: heading 90
SOUTH = (0.0, 0.0, -S, S)      # yaw -pi/2: heading 180
WEST = (0.0, 0.0, 1.0, 0.0)    # yaw pi: heading 270
UNKNOWN = [0.0] * 9            # sensor_msgs/Imu: covariance unknown
YAW_01 = [0.0] * 8 + [0.01]    # yaw variance (0.1 rad)^2
SECOND = 1_000_000_000


def heading_of(result):
    """Return the heading of a (prior, reason) result, failing with the reason if none."""
    prior, reason = result
    assert prior is not None, reason
    return prior.heading_deg


def same_angle(a, b, tol=1e-6):
    """Tell whether two headings are the same direction (360 is 0)."""
    return abs(float(angle_difference_deg(a, b))) <= tol


# ------------------------------------------------------------------------------ converters

def test_imu_enu_yaw_becomes_compass_heading():
    for quaternion, heading in ((NORTH, 0.0), (EAST, 90.0), (SOUTH, 180.0), (WEST, 270.0)):
        assert same_angle(heading_of(imu_prior(quaternion, UNKNOWN, 10.0)), heading)
    # A quaternion not of unit norm is the same orientation.
    assert same_angle(heading_of(imu_prior([2 * v for v in EAST], UNKNOWN, 10.0)), 90.0)
    # Yaw 30 deg (counter-clockwise from east) is heading 60.
    yaw = math.radians(30.0)
    q = (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))
    assert same_angle(heading_of(quaternion_prior(q, 10.0)), 60.0)


def test_imu_sigma_from_yaw_variance_else_the_default():
    prior, reason = imu_prior(EAST, YAW_01, 10.0)
    assert reason == '' and prior.sigma_deg == pytest.approx(5.7296, abs=1e-4)
    assert prior.source == 'given'
    assert imu_prior(EAST, UNKNOWN, 7.5)[0].sigma_deg == 7.5          # all zeros: unknown
    assert imu_prior(EAST, [0.02, 0, 0, 0, 0.02, 0, 0, 0, 0], 7.5)[0].sigma_deg == 7.5
    assert quaternion_prior(EAST, 7.5)[0].sigma_deg == 7.5             # QuaternionStamped


@pytest.mark.parametrize('quaternion, covariance, words', [
    ((math.nan, 0.0, 0.0, 1.0), UNKNOWN, 'not finite'),
    ((0.0, 0.0, 0.0, 0.0), UNKNOWN, 'zero norm'),
    (EAST, [-1.0] + [0.0] * 8, 'no orientation'),
    (EAST, [0.0] * 8 + [1.0e6], 'says nothing'),     # this node's own "unknown yaw"
    (EAST, [0.0] * 8 + [-0.01], 'not a variance'),
    (EAST, [0.0] * 8 + [math.nan], 'not a variance'),
    (EAST, [0.0] * 4, 'expected 9'),
])
def test_imu_without_a_usable_heading_is_refused_with_a_reason(quaternion, covariance, words):
    prior, reason = imu_prior(quaternion, covariance, 10.0)
    assert prior is None and words in reason


def test_message_prior_reads_ros_messages():
    imu = Imu()
    imu.orientation.z, imu.orientation.w = NORTH[2], NORTH[3]
    imu.orientation_covariance[8] = 0.01
    prior, _ = message_prior(imu, 'imu', 10.0)
    assert same_angle(prior.heading_deg, 0.0) and prior.sigma_deg == pytest.approx(5.7296, 1e-4)
    stamped = QuaternionStamped()
    stamped.quaternion.z, stamped.quaternion.w = SOUTH[2], SOUTH[3]
    prior, _ = message_prior(stamped, 'quaternion', 4.0)
    assert same_angle(prior.heading_deg, 180.0) and prior.sigma_deg == 4.0
    imu.orientation.x = math.nan
    assert message_prior(imu, 'imu', 10.0)[0] is None
    assert message_prior(stamped, 'imu', 10.0)[0] is None   # the wrong type: refused, no raise


# ------------------------------------------------------------------------------ time matching

def test_buffer_matches_exact_nearest_and_interpolates_across_north():
    buffer = OrientationBuffer()
    buffer.add(2 * SECOND, HeadingPrior(10.0, 3.0))
    buffer.add(1 * SECOND, HeadingPrior(350.0, 2.0))   # out of order: kept sorted
    assert buffer.prior_at(1 * SECOND, 0.0)[0].heading_deg == 350.0
    # Halfway between 350 and 10 is north (the short way), a quarter is 355; larger sigma.
    mid = buffer.prior_at(int(1.5 * SECOND), 0.5)[0]
    assert same_angle(mid.heading_deg, 0.0) and mid.sigma_deg == 3.0
    assert same_angle(buffer.prior_at(int(1.25 * SECOND), 1.0)[0].heading_deg, 355.0)
    # Only the sample 0.25 s away is within 0.5 s: it is taken as it is.
    assert buffer.prior_at(int(1.25 * SECOND), 0.5)[0].heading_deg == 350.0
    assert buffer.prior_at(int(2.4 * SECOND), 0.5)[0].heading_deg == 10.0
    prior, reason = buffer.prior_at(5 * SECOND, 0.5)
    assert prior is None and '3.000 s' in reason and 'orientation_max_age_s 0.5' in reason


def test_buffer_refuses_when_empty_and_keeps_the_newest_samples():
    buffer = OrientationBuffer(max_samples=3)
    prior, reason = buffer.prior_at(0, 1.0)
    assert prior is None and 'no orientation message' in reason
    for k in range(5):
        buffer.add(k * SECOND, HeadingPrior(10.0 * k, 1.0))
    assert len(buffer) == 3
    assert buffer.prior_at(0, 0.5)[0] is None                  # dropped: the oldest
    assert buffer.prior_at(2 * SECOND, 0.0)[0].heading_deg == 20.0
    buffer.add(4 * SECOND, HeadingPrior(99.0, 1.0))            # same stamp: replaced
    assert len(buffer) == 3 and buffer.prior_at(4 * SECOND, 0.0)[0].heading_deg == 99.0


# ------------------------------------------------------------------------------ the node

NODE = 'cvgl_o'
CAMERA = '/o/camera'
ORIENTATION = '/o/imu'


def imu_msg(sec, quaternion):
    """Return a sensor_msgs/Imu stamped sec with this orientation, covariance unknown."""
    msg = Imu()
    msg.header.stamp = Time(sec=sec)
    q = msg.orientation
    q.x, q.y, q.z, q.w = quaternion
    return msg


@pytest.mark.integration
def test_node_takes_priors_from_the_topic_and_outlives_bad_ones(small_map, tmp_path):
    """
    A good Imu gives its frame a prior, a NaN one is counted and skipped, frames go on.

    The second frame's only good orientation is 10 s older than it: localized without a prior
    until orientation_max_age_s is raised at run time, when the third frame (20 s) gets it.
    """
    domain = new_domain()
    proc = start_node(NODE, [
        '-p', f'weights:={small_map.weights}', '-p', f'database:={small_map.db}',
        '-p', 'device:=cpu', '-p', 'top_k:=1', '-p', 'rerank:=false',
        '-p', 'image_transport:=compressed', '-p', f'image_topics:=[{CAMERA}]',
        '-p', 'fix_topic:=/o/fix', '-p', 'geopose_topic:=/o/geopose',
        '-p', f'orientation_topic:={ORIENTATION}', '-p', 'diagnostics_period_s:=0.2'],
        process_env(domain), tmp_path / 'node.log')
    listener = Listener(domain)
    try:
        listener.listen(NavSatFix, '/o/fix')
        listener.listen(DiagnosticArray, '/diagnostics')
        camera = listener.node.create_publisher(CompressedImage, CAMERA + '/compressed',
                                                qos_profile_sensor_data)
        imu = listener.node.create_publisher(Imu, ORIENTATION, 10)
        rgb, _, _ = small_map.places[0]
        jpeg = CompressedImage(format='jpeg', data=encode_compressed(rgb, 'jpeg', 95)[1])

        def value(key):
            values = diagnostics_of(listener, NODE)
            return int(values[key]) if values else 0

        def ready():
            assert proc.poll() is None, f'node exited at start:\n{log_of(proc)}'
            return (diagnostics_of(listener, NODE) is not None
                    and camera.get_subscription_count() > 0
                    and imu.get_subscription_count() > 0)

        def orientation(sec, quaternion, key, count):
            msg = imu_msg(sec, quaternion)
            for _ in range(40):
                imu.publish(msg)
                try:
                    return listener.wait_for(lambda: value(key) >= count, 0.5, key)
                except AssertionError:
                    continue
            raise AssertionError(f'{key} never reached {count}\n{log_of(proc)}')

        def frame(sec):
            jpeg.header.stamp = Time(sec=sec)
            fixes = listener.received['/o/fix']
            for _ in range(40):
                camera.publish(jpeg)
                try:
                    return listener.wait_for(lambda: with_stamp(fixes, [sec, 0]), 0.5, 'fix')
                except AssertionError:
                    continue
            raise AssertionError(f'no fix for the frame at {sec} s\n{log_of(proc)}')

        listener.wait_for(ready, START_TIMEOUT_S, 'the node to start')
        orientation(6000, NORTH, 'orientation_messages', 1)
        frame(6000)
        listener.wait_for(lambda: value('frames_with_heading_prior') >= 1,
                          what='a frame with a prior')
        assert value('frames_without_heading_prior') == 0
        orientation(6010, (math.nan, 0.0, 0.0, 1.0), 'bad_orientation_messages', 1)
        frame(6010)
        listener.wait_for(lambda: value('frames_without_heading_prior') >= 1,
                          what='a frame without a prior')
        with_before = value('frames_with_heading_prior')
        messages = [s.message for m in listener.received['/diagnostics'] for s in m.status
                    if s.name == f'{NODE}: localization']
        assert any('bad orientation message' in m for m in messages), messages
        assert any('10.000 s from the image' in m for m in messages), messages
        request = SetParameters.Request(parameters=[
            Parameter('orientation_max_age_s', value=30.0).to_parameter_msg()])
        result, = listener.call(SetParameters, f'/{NODE}/set_parameters', request).results
        assert result.successful, result.reason
        frame(6020)
        listener.wait_for(lambda: value('frames_with_heading_prior') > with_before,
                          what='the raised max age to give the frame a prior')
        # A compass stamped 10 ms after the camera and sent 50 ms after the image: the worker
        # waits for it instead of localizing the frame without a prior (held: 40 s older).
        request = SetParameters.Request(parameters=[
            Parameter('orientation_max_age_s', value=0.5).to_parameter_msg()])
        result, = listener.call(SetParameters, f'/{NODE}/set_parameters', request).results
        assert result.successful, result.reason
        with_before = value('frames_with_heading_prior')
        jpeg.header.stamp = Time(sec=6040)
        camera.publish(jpeg)
        time.sleep(0.05)
        late = imu_msg(6040, NORTH)
        late.header.stamp = Time(sec=6040, nanosec=10_000_000)
        imu.publish(late)
        listener.wait_for(lambda: with_stamp(listener.received['/o/fix'], [6040, 0]), 10.0,
                          'the fix of the frame sent once')
        listener.wait_for(lambda: value('frames_with_heading_prior') > with_before,
                          what='the frame to wait for the compass stamped just after it')
        assert proc.poll() is None
        log = log_of(proc)
        assert 'ignored an orientation message' in log and 'not finite' in log
        assert f'heading prior from {ORIENTATION} (imu)' in log
    finally:
        listener.close()
        assert stop(proc) == 0, log_of(proc)
    assert 'Traceback' not in log_of(proc)


# ------------------------------------------------------------------------------ bags and CLIs

T0 = 1_700_000_000 * SECOND
IMAGES = '/camera/image_raw'
GT = '/gps/fix'
IMU = '/imu/data'
FRAMES = (2, 0, 1)   # the places shown, one a second


def bag_imu(stamp, quaternion, covariance):
    """Return a rosbags sensor_msgs/Imu."""
    types = bags.typestore().types
    sec, nanosec = divmod(stamp, SECOND)
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id='imu')
    vector = types['geometry_msgs/msg/Vector3'](x=0.0, y=0.0, z=0.0)
    x, y, z, w = quaternion
    return types['sensor_msgs/msg/Imu'](
        header=header, orientation=types['geometry_msgs/msg/Quaternion'](x=x, y=y, z=z, w=w),
        orientation_covariance=np.array(covariance, float), angular_velocity=vector,
        angular_velocity_covariance=np.zeros(9), linear_acceleration=vector,
        linear_acceleration_covariance=np.zeros(9))


@pytest.fixture(scope='module')
def drive(small_map, tmp_path_factory):
    """
    Write a bag of places 2, 0, 1 at 1, 2, 3 s (ground truth at each place) and an Imu topic.

    Imu: a good message at 1 s, a NaN one at 2 s, a zero quaternion at 2.9 s: only the first
    frame has a usable orientation within 0.5 s.
    """
    path = tmp_path_factory.mktemp('orientation_bag') / 'drive'
    with bags.BagWriter(path) as writer:
        for k, place in enumerate(FRAMES):
            rgb, lat, lon = small_map.places[place]
            stamp = T0 + (k + 1) * SECOND
            writer.write_image(IMAGES, stamp, rgb)
            writer.write_navsat(GT, stamp, lat, lon, 100.0)
        for seconds, quaternion in ((1.0, NORTH), (2.0, (math.nan, 0.0, 0.0, 1.0)),
                                    (2.9, (0.0, 0.0, 0.0, 0.0))):
            stamp = T0 + int(seconds * SECOND)
            writer.write_msg(IMU, stamp, bag_imu(stamp, quaternion, YAW_01))
    return path


def test_evaluate_bag_matches_priors_and_reports_them(small_map, drive, tmp_path):
    localizer = CVGLLocalizer.from_files(small_map.weights, small_map.db, 'cpu', 'fp32',
                                         LocalizerConfig(top_k=3, rotation_tta=4))
    result = runs.evaluate_bag(drive, IMAGES, GT, None, None, tmp_path / 'out',
                               localizer=localizer, orientation_topic=IMU, progress=False,
                               plots=False)
    prior = result.metrics['heading_prior']
    assert prior['topic'] == IMU and prior['type'] == 'sensor_msgs/msg/Imu'
    assert (prior['messages'], prior['bad_messages']) == (3, 2)
    assert (prior['frames_with'], prior['frames_without']) == (1, 2)
    assert prior['max_age_s'] == 0.5 and result.metrics['inputs']['orientation_topic'] == IMU
    assert json.loads((tmp_path / 'out' / 'metrics.json').read_text())['heading_prior'] == prior
    # The localizer says which heading it used: the prior for the first frame; for the others
    # rotations tried (rotation_tta 4), as retrieval alone leaves no verified heading to track.
    assert prior['localizer_sources'] == {'given': 1, 'tta': 2}


def test_evaluate_cli_takes_the_topic_from_the_params_file_unless_the_flag(small_map, drive,
                                                                           tmp_path):
    params = tmp_path / 'cvgl.yaml'
    params.write_text(f'/**:\n  ros__parameters:\n    orientation_topic: {IMU}\n'
                      f'    orientation_max_age_s: 1.5\n')
    common = ['--bag', str(drive), '--image-topic', IMAGES, '--gt-topic', GT,
              '--db', str(small_map.db), '--weights', str(small_map.weights),
              '--params-file', str(params), '--no-rerank', '--top-k', '1', '--device', 'cpu',
              '--no-plots', '--no-progress']
    assert evaluate.main([*common, '--out', str(tmp_path / 'a')]) == 0
    prior = json.loads((tmp_path / 'a' / 'metrics.json').read_text())['heading_prior']
    # Within 1.5 s the good message at 1 s also serves the frame at 2 s (not the one at 3 s).
    assert prior['topic'] == IMU and prior['max_age_s'] == 1.5
    assert (prior['frames_with'], prior['frames_without']) == (2, 1)
    assert prior['localizer_sources'] == {'given': 2, 'tta': 1}
    assert evaluate.main([*common, '--orientation-topic', '', '--out', str(tmp_path / 'b')]) == 0
    prior = json.loads((tmp_path / 'b' / 'metrics.json').read_text())['heading_prior']
    assert prior['topic'] is None and (prior['frames_with'], prior['frames_without']) == (0, 3)
    assert prior['localizer_sources'] == {'tta': 3}   # the node's default rotation_tta 8


def test_localize_cli_heading_flags(small_map, capsys):
    image = str(small_map.images_dir / 'place_02.png')
    common = ['--db', str(small_map.db), '--weights', str(small_map.weights), '--no-rerank',
              '--top-k', '1', '--device', 'cpu', '--json', image]
    for flags, words in ((['--heading-deg', 'nan'], '--heading-deg must be a finite'),
                         (['--heading-deg', '10', '--heading-sigma-deg', 'inf'],
                          '--heading-sigma-deg must be'),
                         (['--heading-deg', '10', '--heading-sigma-deg', '0'],
                          '--heading-sigma-deg must be'),
                         (['--heading-sigma-deg', '5'], 'needs --heading-deg')):
        assert localize.main([*common, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith('taco-cvgl: error: ') and words in err and 'Traceback' not in err
    assert localize.main([*common, '--heading-deg', '0', '--heading-sigma-deg', '3']) == 0
    assert json.loads(capsys.readouterr().out)['heading_source'] == 'given'
    assert localize.main(common) == 0
    assert json.loads(capsys.readouterr().out)['heading_source'] == 'tta'
