"""
cvgl_node in a robot_localization / Nav2 setup: heading as Imu, run-time parameters, track reset.

One node process (as test_node.py starts them: its own process, real rclpy and DDS) with the
default geometric verification, the motion prior and an Imu output; this process plays the
camera (JPEG frames of the map's places, so no shared-memory profile is needed here) and calls
the node's services. The replay test plays a bag with --clock to a node that uses sim time.
"""

import itertools
import math
import time

from builtin_interfaces.msg import Time
import cv2
from diagnostic_msgs.msg import DiagnosticArray
import pytest
from rcl_interfaces.srv import DescribeParameters, GetParameters, SetParameters
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Imu, NavSatFix, NavSatStatus
from std_srvs.srv import Trigger
from taco_cvgl.cli import replay
from taco_cvgl.files import bags
from taco_cvgl.localization.localizer import Measurement
from taco_cvgl.ros import messages
from taco_cvgl.ros.messages import UNKNOWN_ANGLE_VARIANCE
from taco_cvgl.ros.spinning import BackgroundSpinner
from test_node import (diagnostics_of, Listener, log_of, new_domain, process_env,
                       start_node, START_TIMEOUT_S, stop, with_stamp)

# Tier (README, "Tests"): node processes over real DDS.
pytestmark = pytest.mark.integration

NODE = 'cvgl_r'
CAMERA = '/r/camera'
# Verified heading: RerankConfig.heading_sigma_deg (2 deg) as a variance in rad^2.
VERIFIED_YAW_VARIANCE = math.radians(2.0) ** 2


def heading_measurement(fix=True, heading=0.0):
    """Return a Measurement with a heading (degrees clockwise from north)."""
    return Measurement(timestamp=1.0, fix=fix, latitude=46.5, longitude=6.6, altitude=400.0,
                       heading=heading, heading_variance=0.04,
                       position_covariance=[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]],
                       confidence=0.9, matches=[])


def test_heading_imu_is_orientation_only_enu_yaw():
    """North is ENU yaw +90 deg, east 0; other fields marked absent; no message without one."""
    north = messages.heading_imu(heading_measurement(heading=0.0), Time(), 'base')
    east = messages.heading_imu(heading_measurement(heading=90.0), Time(), 'base')
    assert math.degrees(2 * math.atan2(north.orientation.z, north.orientation.w)) == \
        pytest.approx(90.0)
    assert (east.orientation.z, east.orientation.w) == pytest.approx((0.0, 1.0))
    assert list(north.orientation_covariance) == [UNKNOWN_ANGLE_VARIANCE, 0, 0,
                                                  0, UNKNOWN_ANGLE_VARIANCE, 0, 0, 0, 0.04]
    assert north.angular_velocity_covariance[0] == -1.0
    assert north.linear_acceleration_covariance[0] == -1.0
    assert north.header.frame_id == 'base'
    assert messages.heading_imu(heading_measurement(fix=False), Time(), 'base') is None
    assert messages.heading_imu(heading_measurement(heading=math.nan), Time(),
                                'base') is None


class Robot:
    """The node process, and in this process its camera and a listener of its outputs."""

    def __init__(self, small_map, work):
        domain = new_domain()
        self.proc = start_node(NODE, [
            '-p', f'weights:={small_map.weights}', '-p', f'database:={small_map.db}',
            '-p', 'device:=cpu', '-p', 'image_transport:=compressed',
            '-p', f'image_topics:=[{CAMERA}]', '-p', 'fix_topic:=/r/fix',
            '-p', 'geopose_topic:=/r/geopose', '-p', 'imu_topic:=/r/imu',
            '-p', 'frame_id:=robot_base', '-p', 'prior_radius_m:=50.0',
            '-p', 'diagnostics_period_s:=0.2'], process_env(domain), work / 'node.log')
        self.listener = Listener(domain)
        for kind, topic in ((NavSatFix, '/r/fix'), (Imu, '/r/imu'),
                            (DiagnosticArray, '/diagnostics')):
            self.listener.listen(kind, topic)
        self.camera = self.listener.node.create_publisher(
            CompressedImage, CAMERA + '/compressed', qos_profile_sensor_data)
        self.seconds = itertools.count(5000, 10)  # image stamps, increasing (the motion track)
        self.jpegs = [cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
                      for rgb, _, _ in small_map.places]
        self.places = small_map.places

    def wait_ready(self):
        """Wait for the node's first diagnostics (it has loaded model and map)."""
        def ready():
            assert self.proc.poll() is None, f'node exited at start:\n{log_of(self.proc)}'
            return diagnostics_of(self.listener, NODE) is not None
        self.listener.wait_for(ready, START_TIMEOUT_S, 'the node to start')
        self.listener.wait_for(lambda: self.camera.get_subscription_count() > 0,
                               what='the node to subscribe to the camera')

    def show(self, place, until, what):
        """Publish a place's frame with a new stamp until until(stamp) holds; return the stamp."""
        stamp = [next(self.seconds), 0]
        msg = CompressedImage(format='jpeg', data=self.jpegs[place])
        msg.header.stamp.sec = stamp[0]
        for _ in range(40):
            self.camera.publish(msg)
            try:
                self.listener.wait_for(lambda: until(stamp), 0.5, what)
                return stamp
            except AssertionError:
                continue
        raise AssertionError(f'no {what} for the frame stamped {stamp}\n{log_of(self.proc)}')

    def set_params(self, **values):
        """Set parameters through the node's service; return each SetParametersResult."""
        request = SetParameters.Request(parameters=[
            Parameter(name, value=value).to_parameter_msg() for name, value in values.items()])
        return self.listener.call(SetParameters, f'/{NODE}/set_parameters', request).results

    def fixes(self, stamp):
        """Return the NavSatFix messages of one frame."""
        return with_stamp(self.listener.received['/r/fix'], stamp)

    def motion_track(self):
        """Return the motion_track value of the newest diagnostics."""
        return diagnostics_of(self.listener, NODE)['motion_track']


@pytest.fixture(scope='module')
def robot(small_map, tmp_path_factory):
    """Start the node; stop it at the end."""
    robot = Robot(small_map, tmp_path_factory.mktemp('robot'))
    try:
        robot.wait_ready()
        yield robot
    finally:
        robot.listener.close()
        assert stop(robot.proc) == 0, log_of(robot.proc)
        assert 'Traceback' not in log_of(robot.proc)


def test_imu_heading_and_track_reset(robot):
    """
    A verified fix gives an orientation-only Imu with its ENU yaw; ~/reset_track forgets the track.

    The map is north-up (heading 0) and the camera looks forward: the robot heads north, ENU yaw
    +90 deg, with the verified heading's variance (2 deg sigma).
    """
    imus = robot.listener.received['/r/imu']
    stamp = robot.show(0, lambda s: with_stamp(imus, s), 'Imu')
    imu = with_stamp(imus, stamp)[0]
    fix = robot.fixes(stamp)[0]
    assert fix.status.status == NavSatStatus.STATUS_FIX
    assert imu.header.frame_id == fix.header.frame_id == 'robot_base'
    q = imu.orientation
    assert (q.x, q.y) == (0.0, 0.0)
    assert math.degrees(2 * math.atan2(q.z, q.w)) == pytest.approx(90.0, abs=1.0)
    cov = list(imu.orientation_covariance)
    assert cov[0] == cov[4] == UNKNOWN_ANGLE_VARIANCE
    assert cov[8] == pytest.approx(VERIFIED_YAW_VARIANCE)
    assert imu.angular_velocity_covariance[0] == imu.linear_acceleration_covariance[0] == -1.0
    # The verified fix started the motion prior's track; the service resets it.
    robot.listener.wait_for(lambda: robot.motion_track() == 'tracking', what='a track')
    response = robot.listener.call(Trigger, f'/{NODE}/reset_track', Trigger.Request())
    assert response.success and 'reset' in response.message
    robot.listener.wait_for(lambda: robot.motion_track() == 'acquiring',
                            what='the track to be reset')
    assert 'motion track reset' in log_of(robot.proc)


def test_parameters_change_at_run_time_within_their_limits(robot):
    """min_confidence and publish_no_fix apply to the next frame; bad changes are refused."""
    # Verified confidence is inliers / (inliers + 15) < 1: at 1.0 nothing is a fix.
    assert all(r.successful for r in robot.set_params(min_confidence=1.0, publish_no_fix=True))
    stamp = robot.show(1, robot.fixes, 'NO_FIX NavSatFix')
    fix = robot.fixes(stamp)[0]
    assert fix.status.status == NavSatStatus.STATUS_NO_FIX and math.isnan(fix.latitude)
    assert not with_stamp(robot.listener.received['/r/imu'], stamp)  # no fix, no heading
    refused = {
        'weights': ('/other.safetensors', 'read-only'),     # needs a reload: read-only
        'min_confidence': (1.5, 'out of range'),            # outside the descriptor's range
        'top_k': (0, 'out of range'),
        'max_rate_hz': (2, 'Wrong parameter type'),         # an integer for a double
        'camera_yaws_deg': ([0.0, 90.0], 'camera_yaws_deg: 2 value(s) for 1 image topic'),
    }
    for name, (value, reason) in refused.items():
        result, = robot.set_params(**{name: value})
        assert not result.successful and reason in result.reason, (name, result.reason)
    got = robot.listener.call(GetParameters, f'/{NODE}/get_parameters', GetParameters.Request(
        names=['min_confidence', 'top_k'])).values
    assert (got[0].double_value, got[1].integer_value) == (1.0, 10)  # unchanged by refusals
    described, = robot.listener.call(DescribeParameters, f'/{NODE}/describe_parameters',
                                     DescribeParameters.Request(names=['weights'])).descriptors
    assert described.read_only and 'restart the node' in described.additional_constraints
    # Back to the default threshold: the same kind of frame is a fix again.
    assert all(r.successful for r in robot.set_params(min_confidence=0.5, publish_no_fix=False))
    stamp = robot.show(1, lambda s: with_stamp(robot.listener.received['/r/imu'], s), 'fix')
    assert robot.fixes(stamp)[0].status.status == NavSatStatus.STATUS_FIX
    log = log_of(robot.proc)
    assert 'min_confidence=0.5' in log and 'publish_no_fix=False' in log  # logged when applied


def test_replay_clock_drives_a_sim_time_node(tmp_path, monkeypatch):
    """
    Replay --clock: a node with use_sim_time sees the bag's log times, and time runs between.

    Messages at 1000.0, 1000.3 and 1000.6 s bag time: when each arrives, the node's clock reads
    its log time (wall time is 1.7e9 s); /clock ticks in between at 40 Hz, rising.
    """
    monkeypatch.setenv('ROS_DOMAIN_ID', new_domain())
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    log_ns = [1000_000_000_000 + i * 300_000_000 for i in range(3)]
    bag = tmp_path / 'clock_bag'
    with bags.BagWriter(bag) as writer:
        for stamp in log_ns:
            writer.write_navsat('/clock_test/fix', stamp, 46.5, 6.6, 400.0)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('sim_time_user', context=context, parameter_overrides=[
        Parameter('use_sim_time', value=True)])
    seen, ticks = [], []
    node.create_subscription(NavSatFix, '/clock_test/fix', lambda msg: seen.append(
        (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec,
         node.get_clock().now().nanoseconds)), 10)
    node.create_subscription(Clock, '/clock', lambda msg: ticks.append(
        msg.clock.sec * 10**9 + msg.clock.nanosec), 100)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        with BackgroundSpinner(executor, period_s=0.01):
            assert replay.main([str(bag), '--clock', '--start-delay', '1.0']) == 0
            deadline = time.monotonic() + 5.0
            while len(seen) < len(log_ns) and time.monotonic() < deadline:
                time.sleep(0.02)  # acknowledged, maybe not yet handed to the callback
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    assert [stamp for stamp, _ in seen] == log_ns
    for stamp, now in seen:
        assert abs(now - stamp) < 60_000_000, (stamp, now)  # within ~2 ticks of 25 ms
    between = [t for t in ticks if log_ns[0] < t < log_ns[-1]]
    assert len(between) >= 10 and between == sorted(between)  # 40 Hz over 0.6 s: ~24
