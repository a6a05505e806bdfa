"""
Camera extrinsics from TF (use_tf): known answers, and a node that reads its camera's mount.

The rotation math by known answers, the transform chain and the lever arm; then a node process
that takes its camera's yaw and lever arm from a static transform published by another process.

Known answers (REP-103 optical frame: z out of the lens, x right, y down the image):
- a camera looking straight down with the image's top towards the robot's front has the optical
  axes x = -y_body, y = -x_body, z = -z_body: the half turn about (1, -1, 0)/sqrt(2), quaternion
  (s, -s, 0, 0) with s = sqrt(1/2); turned by a yaw t about the body's z it is
  q_z(t) * (s, -s, 0, 0) = (s (cos t/2 + sin t/2), s (sin t/2 - cos t/2), 0, 0), whose mounting
  yaw is t (t = 90 deg gives (1, 0, 0, 0): the image's top towards the robot's left);
- a camera looking forward, level, has x = -y_body, y = -z_body, z = x_body: quaternion
  (-1/2, 1/2, -1/2, 1/2) (rpy -90, 0, -90 deg), mounting yaw 0 as a forward camera; as a
  nadir camera its image's up is the sky, which has no yaw.
"""

import math
import subprocess
import sys
import types

import cv2
from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import pytest
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Imu, NavSatFix, NavSatStatus
from taco_cvgl.errors import InputError
from taco_cvgl.geo.geodesy import azimuth_distance
from taco_cvgl.ros.extrinsics import lever_enu, mounting_yaw_deg, to_base, TransformTree
from test_node import (diagnostics_of, Listener, log_of, new_domain, process_env, ROOT,
                       start_node, START_TIMEOUT_S, stop, with_stamp)

S = math.sqrt(0.5)
FORWARD_OPTICAL = (-0.5, 0.5, -0.5, 0.5)
# RIHS01 hash of the real tf2_msgs/msg/TFMessage (ros2/geometry2; Humble to Kilted): the
# definition in rosbags' ROS 2 type stores, hashed by rosbags.
TFMESSAGE_HASH = 'RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087'


def nadir_quaternion(yaw_deg):
    """Return the quaternion of a nadir camera turned by yaw_deg (see the module docstring)."""
    half = math.radians(yaw_deg) / 2.0
    return (S * (math.cos(half) + math.sin(half)), S * (math.sin(half) - math.cos(half)), 0.0, 0.0)


def same_angle(a, b, tol=1e-9):
    """Return whether two angles in degrees are equal modulo 360."""
    return abs((a - b + 180.0) % 360.0 - 180.0) < tol


@pytest.mark.parametrize('yaw', [0.0, 30.0, 90.0, -45.0, -135.0, 180.0])
def test_nadir_mounting_yaw_is_the_direction_of_the_image_top(yaw):
    """The image's top (-y optical) projected on the body's plane gives the yaw."""
    assert same_angle(mounting_yaw_deg(nadir_quaternion(yaw), 'nadir'), yaw)


def test_known_quaternions():
    """(1, 0, 0, 0): looking down, top to the left, +90; forward optical: 0; a scaled one too."""
    assert mounting_yaw_deg((1.0, 0.0, 0.0, 0.0)) == pytest.approx(90.0)
    assert mounting_yaw_deg((S, -S, 0.0, 0.0)) == pytest.approx(0.0)
    assert mounting_yaw_deg((2.0, 0.0, 0.0, 0.0)) == pytest.approx(90.0)  # normalised
    assert mounting_yaw_deg(FORWARD_OPTICAL, 'forward') == pytest.approx(0.0, abs=1e-9)
    # The forward camera turned to look left (yaw +90 about the body's z): q_z(90) * q.
    # q_z(90) = (0, 0, S, S) times (-1/2, 1/2, -1/2, 1/2) is (-S, 0, 0, S): -90 deg about x,
    # whose columns are x (1, 0, 0), y (0, 0, -1) and z (0, 1, 0): the lens looks left.
    left = (-S, 0.0, 0.0, S)
    assert mounting_yaw_deg(left, 'forward') == pytest.approx(90.0)


def test_vertical_directions_and_bad_quaternions_are_refused():
    """A nadir model on a forward camera (up is the sky), a forward model looking down, q = 0."""
    with pytest.raises(InputError, match='vertical'):
        mounting_yaw_deg(FORWARD_OPTICAL, 'nadir')
    with pytest.raises(InputError, match='vertical'):
        mounting_yaw_deg((1.0, 0.0, 0.0, 0.0), 'forward')
    with pytest.raises(InputError, match='not a rotation'):
        mounting_yaw_deg((0.0, 0.0, 0.0, 0.0))
    with pytest.raises(InputError, match='not a rotation'):
        mounting_yaw_deg((math.nan, 0.0, 0.0, 1.0))


def test_lever_arm_in_east_north():
    """Heading north: forward is north, left is west; heading east: forward east, left north."""
    assert lever_enu((1.0, 0.0), 0.0) == pytest.approx((0.0, 1.0))
    assert lever_enu((0.0, 1.0), 0.0) == pytest.approx((-1.0, 0.0))
    assert lever_enu((1.0, 0.0), 90.0) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert lever_enu((0.0, 1.0), 90.0) == pytest.approx((0.0, 1.0), abs=1e-12)
    assert lever_enu((2.0, 1.0), 225.0) == pytest.approx(
        (-2 * S + S, -2 * S - S))  # heading south-west: forward (-S, -S), left (S, -S)


def measurement(heading, lat=46.5, lon=6.6):
    """Return a stand-in with the fields to_base reads and writes."""
    import dataclasses

    @dataclasses.dataclass
    class M:
        latitude: float
        longitude: float
        heading: float
        position_covariance: np.ndarray

    return M(lat, lon, heading, np.diag([1.0, 1.0, 4.0]))


def test_to_base_subtracts_the_turned_lever_arm():
    """Camera 2 m ahead and 1 m left of the body, robot heading east: body 2 m W, 1 m S."""
    camera = measurement(heading=90.0)
    base = to_base(camera, (2.0, 1.0))
    azimuth, distance = azimuth_distance(camera.latitude, camera.longitude,
                                         base.latitude, base.longitude)
    assert float(distance) == pytest.approx(math.sqrt(5.0), abs=1e-6)
    assert same_angle(float(azimuth), math.degrees(math.atan2(-2.0, -1.0)), 1e-6)
    assert to_base(camera, (0.0, 0.0)) is camera


def test_to_base_without_heading_widens_the_covariance():
    """No heading, no direction: the camera's position, horizontal variances + |lever|^2."""
    camera = measurement(heading=math.nan)
    base = to_base(camera, (3.0, 4.0))
    assert (base.latitude, base.longitude) == (camera.latitude, camera.longitude)
    assert np.diag(base.position_covariance) == pytest.approx([26.0, 26.0, 4.0])


def test_transform_tree_composes_the_chain():
    """
    base_link -> mast (up 1 m, turned +90 deg) -> cam (0.5 m along the mast's x, (1, 0, 0, 0)).

    The camera is at (0, 0.5, 1) in base_link; its rotation q_z(90) * (1, 0, 0, 0) is
    (S, S, 0, 0): its image's top, left of the mast, points backwards: yaw 180.
    """
    tree = TransformTree()
    tree.add('base_link', 'mast', (0.0, 0.0, 1.0), (0.0, 0.0, S, S))
    tree.add('/mast', 'cam', (0.5, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0))
    translation, rotation = tree.lookup('base_link', 'cam')
    assert translation == pytest.approx((0.0, 0.5, 1.0), abs=1e-12)
    assert np.abs(np.dot(rotation, (S, S, 0.0, 0.0))) == pytest.approx(1.0)
    assert same_angle(mounting_yaw_deg(rotation), 180.0, 1e-6)
    back, _ = tree.lookup('cam', 'base_link')   # the inverse: base_link seen from the camera
    assert np.linalg.norm(back) == pytest.approx(math.hypot(0.5, 1.0))
    with pytest.raises(LookupError, match='no chain'):
        tree.lookup('base_link', 'other_cam')
    tree.add('cam', 'base_link', (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))  # a loop
    with pytest.raises(LookupError, match='loop'):
        tree.lookup('base_link', 'cam')


def test_tfmessage_copy_is_the_real_definition():
    """interfaces/tf2_msgs's TFMessage is the real one: rosbags' store takes it as the same."""
    from rosbags.typesys import get_typestore, get_types_from_msg, Stores

    typestore = get_typestore(Stores.ROS2_KILTED)   # holds the real tf2_msgs
    text = (ROOT / 'interfaces' / 'tf2_msgs' / 'msg' / 'TFMessage.msg').read_text()
    typestore.register(get_types_from_msg(text, 'tf2_msgs/msg/TFMessage'))  # refused if not
    assert typestore.hash_rihs01('tf2_msgs/msg/TFMessage') == TFMESSAGE_HASH


# Publishes one static transform base_link -> cam_optical (lever arm and rotation from argv) on
# /tf_static, as tf2_ros' StaticTransformBroadcaster does, then waits until stdin closes.
STATIC_TF = r"""
import sys, rclpy
from geometry_msgs.msg import TransformStamped
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from tf2_msgs.msg import TFMessage
rclpy.init()
node = rclpy.create_node('test_static_tf')
qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                 reliability=ReliabilityPolicy.RELIABLE)
pub = node.create_publisher(TFMessage, '/tf_static', qos)
x, y, z, qx, qy, qz, qw = map(float, sys.argv[1:8])
t = TransformStamped()
t.header.frame_id, t.child_frame_id = 'base_link', 'cam_optical'
t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = x, y, z
r = t.transform.rotation
r.x, r.y, r.z, r.w = qx, qy, qz, qw
pub.publish(TFMessage(transforms=[t]))
print('published', flush=True)
sys.stdin.read()
"""
NODE = 'cvgl_tf'
CAMERA = '/tf_test/camera'
LEVER = (2.0, 1.0, 1.5)   # camera 2 m ahead, 1 m left of and 1.5 m above base_link


def advertised_hash(listener, topic):
    """Return the type hash the middleware advertises for the publisher of a topic."""
    listener.wait_for(lambda: listener.node.get_publishers_info_by_topic(topic),
                      what=f'a publisher on {topic}')
    return str(listener.node.get_publishers_info_by_topic(topic)[0].topic_type_hash)


def enu_yaw_deg(imu):
    """Return the ENU yaw (deg) of an Imu's orientation (yaw only)."""
    return math.degrees(2.0 * math.atan2(imu.orientation.z, imu.orientation.w))


@pytest.fixture
def tf_system(small_map, tmp_path):
    """Start the node with use_tf (camera_yaws_deg 0), a listener and camera here; no TF yet."""
    domain = new_domain()
    env = process_env(domain)
    proc = start_node(NODE, [
        '-p', f'weights:={small_map.weights}', '-p', f'database:={small_map.db}',
        '-p', 'device:=cpu', '-p', 'image_transport:=compressed', '-p', 'top_k:=1',
        '-p', 'rerank:=false', '-p', 'rotation_tta:=1', '-p', f'image_topics:=[{CAMERA}]',
        '-p', 'camera_yaws_deg:=[0.0]', '-p', 'use_tf:=true', '-p', 'fix_topic:=/tf_test/fix',
        '-p', 'imu_topic:=/tf_test/imu', '-p', 'diagnostics_period_s:=0.2'],
        env, tmp_path / 'node.log')
    listener = Listener(domain)
    for kind, topic in ((NavSatFix, '/tf_test/fix'), (Imu, '/tf_test/imu'),
                        (DiagnosticArray, '/diagnostics')):
        listener.listen(kind, topic)
    camera = listener.node.create_publisher(CompressedImage, CAMERA + '/compressed',
                                            qos_profile_sensor_data)
    system = types.SimpleNamespace(proc=proc, listener=listener, camera=camera, env=env,
                                   tf=None, stamps=iter(range(7000, 8000, 10)))
    try:
        def ready():
            assert proc.poll() is None, f'node exited at start:\n{log_of(proc)}'
            return diagnostics_of(listener, NODE) is not None
        listener.wait_for(ready, START_TIMEOUT_S, 'the node to start')
        listener.wait_for(lambda: camera.get_subscription_count() > 0, what='a subscription')
        yield system
    finally:
        if system.tf is not None:
            system.tf.stdin.close()
            stop(system.tf)
        listener.close()
        assert stop(proc) == 0, log_of(proc)
        assert 'Traceback' not in log_of(proc)


def show(system, jpeg):
    """Publish a frame (frame_id cam_optical) until its Imu arrives; return (fix, imu)."""
    msg = CompressedImage(format='jpeg', data=jpeg)
    msg.header.frame_id = 'cam_optical'
    msg.header.stamp.sec = next(system.stamps)
    stamp = [msg.header.stamp.sec, 0]
    imus = system.listener.received['/tf_test/imu']
    for _ in range(40):
        system.camera.publish(msg)
        try:
            system.listener.wait_for(lambda: with_stamp(imus, stamp), 0.5, 'Imu')
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f'no Imu for the frame {stamp}\n{log_of(system.proc)}')
    system.listener.wait_for(lambda: with_stamp(system.listener.received['/tf_test/fix'],
                                                stamp), what='NavSatFix')
    return with_stamp(system.listener.received['/tf_test/fix'], stamp)[0], \
        with_stamp(imus, stamp)[0]


@pytest.mark.integration
def test_node_takes_the_camera_mount_from_a_static_transform(tf_system, small_map):
    """
    Without TF the node uses camera_yaws_deg (0) and says so once; then TF's mount is used.

    The map is north-up (heading 0) and the frame is place 0's own image: its top is north.
    camera_yaws_deg 0: the robot heads north (ENU yaw 90) and the fix is the camera's, place 0.
    The transform base_link -> cam_optical (1, 0, 0, 0) turns the image's top to the robot's
    left: the robot heads east (ENU yaw 0), and base_link lies the lever arm (2 m ahead, 1 m
    left) behind the camera: 2 m west and 1 m south of it, sqrt(5) m at bearing 243.43 deg.
    """
    _, lat, lon = small_map.places[0]
    jpeg = cv2.imencode('.jpg', cv2.cvtColor(small_map.places[0][0], cv2.COLOR_RGB2BGR))[1]
    jpeg = jpeg.tobytes()
    fix, imu = show(tf_system, jpeg)
    assert fix.status.status == NavSatStatus.STATUS_FIX
    assert enu_yaw_deg(imu) == pytest.approx(90.0, abs=1e-6)
    _, distance = azimuth_distance(lat, lon, fix.latitude, fix.longitude)
    assert float(distance) < 0.01   # the place itself
    assert log_of(tf_system.proc).count('no camera mount from TF') == 1

    tf_system.tf = subprocess.Popen(
        [sys.executable, '-c', STATIC_TF, *map(str, LEVER), '1', '0', '0', '0'], cwd=ROOT,
        env=tf_system.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert tf_system.tf.stdout.readline().startswith('published')
    advertised = advertised_hash(tf_system.listener, '/tf_static')
    assert advertised == TFMESSAGE_HASH   # the type built here is the real one on the wire
    for _ in range(60):   # until the node has the transform (discovery, then transient local)
        fix, imu = show(tf_system, jpeg)
        if abs(enu_yaw_deg(imu)) < 45.0:
            break
    assert enu_yaw_deg(imu) == pytest.approx(0.0, abs=1e-6)
    assert fix.status.status == NavSatStatus.STATUS_FIX
    azimuth, distance = azimuth_distance(lat, lon, fix.latitude, fix.longitude)
    assert float(distance) == pytest.approx(math.sqrt(5.0), abs=0.01)
    assert same_angle(float(azimuth), 180.0 + math.degrees(math.atan2(2.0, 1.0)), 0.5)
    log = log_of(tf_system.proc)
    assert 'base_link -> cam_optical): yaw 90.00 deg, lever arm x 2.000 m, y 1.000 m' in log
    assert log.count('no camera mount from TF') == 1


def test_package_xml_declares_tf_and_its_urls():
    """Robots get tf2_ros (use_tf) and diagnostic_updater; the package names its homes."""
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / 'package.xml').getroot()
    depends = {e.text for e in root.findall('exec_depend')}
    assert {'tf2_ros', 'tf2_msgs', 'diagnostic_updater'} <= depends
    urls = {e.get('type'): e.text for e in root.findall('url')}
    assert set(urls) == {'website', 'repository', 'bugtracker'}
    assert all(url.startswith('https://') for url in urls.values())
    # The order format 3 prescribes: url after license, before the dependencies.
    tags = [e.tag for e in root]
    assert tags.index('license') < tags.index('url') < tags.index('exec_depend')
