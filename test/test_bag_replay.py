"""Bag replay into live topics and recording, over real DDS across processes."""

import json
import os
from pathlib import Path
import random
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from taco_cvgl.files import bags, image_codec
from taco_cvgl.ros.bag_replay import BagPlayer, Recorder, replay
from taco_cvgl.ros.spinning import BackgroundSpinner

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000_000_000
MS = 1_000_000
HEIGHT, WIDTH = 480, 640  # a real camera size: 921,600-byte bgr8 frames

# Counts messages on /camera/image_raw and /gps/fix (reliable, as the replay publishes) and writes
# for each one (topic, header stamp, receive time, payload CRC) to the output JSON file. Messages
# stamped outside the test bag's 10 s (another test on the same domain by chance) are ignored.
SUBSCRIBER = textwrap.dedent("""
    import json, sys, time, zlib
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, NavSatFix

    out_path, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    first, last = int(sys.argv[4]), int(sys.argv[4]) + 10 * 10**9
    rclpy.init()
    node = rclpy.create_node('replay_counter')
    received = []

    def on_image(msg):
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        if first <= stamp <= last:
            received.append(['image', stamp, time.monotonic(), zlib.crc32(bytes(msg.data)),
                             msg.encoding, msg.width, msg.height])

    def on_fix(msg):
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        if first <= stamp <= last:
            received.append(['fix', stamp, time.monotonic(), msg.latitude])

    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, '/camera/image_raw', on_image, qos)
    node.create_subscription(NavSatFix, '/gps/fix', on_fix, qos)
    print('READY', flush=True)
    deadline = time.monotonic() + timeout
    while len(received) < expected and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    with open(out_path, 'w') as f:
        json.dump(received, f)
    node.destroy_node()
    rclpy.shutdown()
""")


def camera_frame(index):
    """Return a distinct 640x480 RGB frame."""
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[:, :, 0] = index * 11
    rgb[index * 20:index * 20 + 40, :, 1] = 255
    rgb[:, ::7, 2] = np.arange(0, WIDTH, 7, dtype=np.uint8)[None, :]
    return rgb


def image_stamps():
    """Return 20 image stamps: 10 at 10 Hz, a 0.6 s pause, 10 more at 10 Hz."""
    return [T0 + i * 100 * MS + (600 * MS if i >= 10 else 0) for i in range(20)]


@pytest.fixture
def domain_env(monkeypatch):
    """Use a random ROS_DOMAIN_ID on localhost so tests running at once do not meet."""
    domain = random.SystemRandom().randint(1, 232)
    monkeypatch.setenv('ROS_DOMAIN_ID', str(domain))
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    return domain, env


@pytest.fixture
def camera_bag(tmp_path):
    """Write a bag of 20 bgr8 640x480 images, 10 NavSatFix and a message type not installed."""
    path = tmp_path / 'drive'
    types = bags.typestore().types
    with bags.BagWriter(path) as writer:
        for i, stamp in enumerate(image_stamps()):
            writer.write_image('/camera/image_raw', stamp, camera_frame(i), encoding='bgr8')
            if i % 2 == 0:
                writer.write_navsat('/gps/fix', stamp + MS, 45.0 + i * 1e-5, 7.0, 300.0)
        # shape_msgs has no Python package here (nor on most robots): replay must skip it and
        # play the rest. (tf2_msgs was the example until make setup began building it.)
        writer.write_msg('/mesh', T0, types['shape_msgs/msg/Mesh'](triangles=[], vertices=[]))
    return path


@pytest.fixture
def ros_context(domain_env):
    """Yield an rclpy context of the test's own, on the test's domain."""
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_env[0])
    yield context
    rclpy.try_shutdown(context=context)


def test_replay_across_processes_keeps_order_payload_and_timing(
        tmp_path, domain_env, camera_bag, ros_context):
    _, env = domain_env
    out = tmp_path / 'received.json'
    expected = 20 + 10
    sub = subprocess.Popen(
        [sys.executable, '-c', SUBSCRIBER, str(out), str(expected), '20', str(T0)],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert sub.stdout.readline().strip() == 'READY'
        node = rclpy.create_node('replayer', context=ros_context)
        player = BagPlayer(node, camera_bag)
        assert player.not_installed == ['/mesh (shape_msgs/msg/Mesh)']
        deadline = time.monotonic() + 15
        while any(p.get_subscription_count() == 0 for p in player.publishers.values()):
            assert time.monotonic() < deadline, 'the subscriber process was never discovered'
            time.sleep(0.05)
        rate = 2.0
        assert player.play(rate=rate, start_delay_s=0.2) == expected
        sub.wait(timeout=25)
        node.destroy_node()
    finally:
        if sub.poll() is None:
            sub.kill()
    received = json.loads(out.read_text())
    images = [r for r in received if r[0] == 'image']
    fixes = [r for r in received if r[0] == 'fix']
    assert [r[1] for r in images] == image_stamps()  # all images, in order
    assert [r[1] for r in fixes] == [s + MS for s in image_stamps()[::2]]
    for i, r in enumerate(images):
        _, _, _, _, data = image_codec.encode_raw(camera_frame(i), 'bgr8')
        assert r[3:] == [zlib.crc32(data), 'bgr8', WIDTH, HEIGHT]

    # Receive times follow the bag's stamps at half speed, pause included.
    first_recv, first_stamp = images[0][2], images[0][1]
    for topic, stamp, recv, *_ in received:
        expected_offset = (stamp - first_stamp) / 1e9 / rate
        assert abs((recv - first_recv) - expected_offset) < 0.15, (topic, stamp)
    assert images[10][2] - images[9][2] == pytest.approx(0.35, abs=0.1)


def test_recorder_records_replayed_topics(tmp_path, domain_env, camera_bag, ros_context):
    out = tmp_path / 'recorded'
    node = rclpy.create_node('recorder', context=ros_context)
    # Remapped names of this test's own, so no other test on the same domain interferes.
    remap = {'/camera/image_raw': '/taco_replay_test/image', '/gps/fix': '/taco_replay_test/fix'}
    recorder = Recorder(node, {remap['/camera/image_raw']: 'sensor_msgs/msg/Image',
                               remap['/gps/fix']: 'sensor_msgs/NavSatFix'}, out, storage='sqlite3')
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    spinner = BackgroundSpinner(executor).start()
    try:
        player_node = rclpy.create_node('player', context=ros_context)
        before = time.time_ns()
        published = replay(camera_bag, rate=0, topics=['/camera/image_raw', '/gps/fix'],
                           remap=remap, start_delay_s=1.0, node=player_node)
        assert published == 30
        deadline = time.monotonic() + 10
        while recorder.count < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not out.exists()  # appears only when finished
        recorder.close()
        player_node.destroy_node()
    finally:
        assert spinner.stop()   # the thread has ended before the executor shuts down
        executor.shutdown()
        node.destroy_node()
    assert recorder.counts == {'/taco_replay_test/image': 20, '/taco_replay_test/fix': 10}
    images = list(bags.iter_images(out, '/taco_replay_test/image'))
    assert [stamp for stamp, _ in images] == image_stamps()  # header stamps kept
    for i, (_, rgb) in enumerate(images):
        np.testing.assert_array_equal(rgb, camera_frame(i))
    log_times = [t for _, _, t, _ in bags.iter_raw(out, ['/taco_replay_test/fix'])]
    assert all(before <= t <= time.time_ns() for t in log_times)  # receive times
    assert bags.read_navsat(out, '/taco_replay_test/fix').lat[3] == pytest.approx(45.0 + 6e-5)


def run_cli(args, env, timeout=40):
    """Run `taco-cvgl replay ARGS` in a fresh process."""
    code = 'import sys; from taco_cvgl.cli.replay import main; sys.exit(main(sys.argv[1:]))'
    return subprocess.run([sys.executable, '-c', code] + [str(a) for a in args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_replays_and_records(tmp_path, domain_env, camera_bag):
    _, env = domain_env
    out = tmp_path / 'run1'
    result = run_cli([camera_bag, '--rate', '4', '--topics', '/gps/fix', '/camera/image_raw',
                      '--remap', '/gps/fix:=/truth/fix', '--record', out,
                      '--record-topics', '/truth/fix:sensor_msgs/msg/NavSatFix',
                      '--tail', '1.0', '--start-delay', '1.0'], env)
    assert result.returncode == 0, result.stderr
    assert 'published 30 messages' in result.stdout
    assert 'recorded 10 messages' in result.stdout
    assert bags.list_topics(out) == {'/truth/fix': 'sensor_msgs/msg/NavSatFix'}
    assert len(bags.read_navsat(out, '/truth/fix')) == 10


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, domain_env, camera_bag):
    _, env = domain_env
    result = run_cli([tmp_path / 'missing'], env)
    assert result.returncode == 2
    assert 'bag not found' in result.stderr and 'Traceback' not in result.stderr
    out = tmp_path / 'never'
    result = run_cli([camera_bag, '--topics', '/nope', '--record', out,
                      '--record-topics', '/a:sensor_msgs/msg/Image'], env)
    assert result.returncode == 2 and '/camera/image_raw (sensor_msgs/msg/Image)' in result.stderr
    assert not out.exists() and not list(tmp_path.glob('.never*'))  # no empty or partial bag
    result = run_cli([camera_bag, '--record', tmp_path / 'x', '--record-topics', '/a'], env)
    assert result.returncode == 2 and 'not of the form' in result.stderr


def test_background_spinner_stops_before_the_executor_shuts_down(ros_context):
    node = rclpy.create_node('spun', context=ros_context)
    ticks = []
    node.create_timer(0.02, lambda: ticks.append(time.monotonic()))
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    try:
        with BackgroundSpinner(executor) as spinner:
            deadline = time.monotonic() + 5
            while len(ticks) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(ticks) >= 5             # callbacks run in the background
        stopped_at = time.monotonic()
        assert spinner.stop(timeout_s=0.0)    # already ended when the block closed
        count = len(ticks)
        time.sleep(0.2)
        assert len(ticks) == count and all(t <= stopped_at for t in ticks)
    finally:
        executor.shutdown()
        node.destroy_node()
