"""
The demo's flight as ROS sees it: a rosbag2 of camera, ground truth and compass, and the node.

`write_flight_bag` writes the simulated flight (demo.views) as an MCAP bag; `run_live` starts the
node as its own process with the demo's params file, replays the bag into it and records the
fixes it publishes, as `ros2 bag record` would on a robot.
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
from taco_cvgl.errors import TacoError

if TYPE_CHECKING:
    from taco_cvgl.localization.settings import NodeParams

IMAGE_TOPIC = '/camera/image_raw'
GT_TOPIC = '/gps/fix'
GT_HEADING_TOPIC = '/gps/heading'   # geometry_msgs/QuaternionStamped, ENU yaw of the camera
COMPASS_TOPIC = '/imu/data'         # sensor_msgs/Imu: a simulated compass, the heading prior
# The simulated compass: a constant bias (a magnetometer's hard-iron error, or a misaligned
# mounting) plus white noise, and the 1-sigma it reports (both together).
COMPASS_BIAS_DEG = 3.0
COMPASS_NOISE_DEG = 2.0
COMPASS_SIGMA_DEG = float(np.hypot(COMPASS_BIAS_DEG, COMPASS_NOISE_DEG))
FIX_TOPIC = '/cvgl/fix'
GEOPOSE_TOPIC = '/cvgl/geopose'


def log(message: str) -> None:
    """Print a progress line with the time."""
    print(f'[demo {time.strftime("%H:%M:%S")}] {message}', flush=True)


def compass(views, seed: int):
    """Return the simulated compass's HeadingPrior for each view (bias + noise, seeded)."""
    from taco_cvgl.localization.heading import HeadingPrior
    noise = np.random.default_rng(seed).normal(0.0, COMPASS_NOISE_DEG, len(views))
    return [HeadingPrior(float(np.mod(view.heading_deg + COMPASS_BIAS_DEG + e, 360.0)),
                         COMPASS_SIGMA_DEG) for view, e in zip(views, noise)]


def write_flight_bag(views, path: Path, seed: int = 0) -> Path:
    """
    Write the flight as a rosbag2 MCAP: images, ground truth and a simulated compass.

    Camera images, ground-truth GPS fixes and headings, and the compass (sensor_msgs/Imu,
    orientation only, REP-145) on COMPASS_TOPIC.
    """
    from taco_cvgl.files.bags import _header, BagWriter, typestore
    from taco_cvgl.geo.geodesy import heading_to_enu_yaw, yaw_to_quaternion
    if path.exists():
        return path
    partial = path.with_name(path.name + '.partial')   # a stopped demo leaves no half bag
    if partial.exists():
        shutil.rmtree(partial)
    types = typestore().types
    yaw_variance = float(np.radians(COMPASS_SIGMA_DEG) ** 2)
    unknown = [-1.0] + [0.0] * 8            # REP-145: this Imu measures no rates, no accel.
    with BagWriter(partial, storage='mcap') as writer:
        for view, prior in zip(views, compass(views, seed)):
            stamp = int(round(view.stamp_s * 1e9))
            writer.write_navsat(GT_TOPIC, stamp, view.latitude, view.longitude, 0.0,
                                cov=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], frame_id='gps')
            x, y, z, w = yaw_to_quaternion(heading_to_enu_yaw(view.heading_deg))
            quaternion = types['geometry_msgs/msg/Quaternion'](x=x, y=y, z=z, w=w)
            writer.write_msg(GT_HEADING_TOPIC, stamp, types[
                'geometry_msgs/msg/QuaternionStamped'](header=_header(stamp, 'camera'),
                                                       quaternion=quaternion))
            x, y, z, w = yaw_to_quaternion(heading_to_enu_yaw(prior.heading_deg))
            vector = types['geometry_msgs/msg/Vector3']
            writer.write_msg(COMPASS_TOPIC, stamp + 10_000_000, types['sensor_msgs/msg/Imu'](
                header=_header(stamp + 10_000_000, 'base_link'),
                orientation=types['geometry_msgs/msg/Quaternion'](x=x, y=y, z=z, w=w),
                orientation_covariance=np.array(
                    [1e6, 0, 0, 0, 1e6, 0, 0, 0, yaw_variance], float),
                angular_velocity=vector(x=0.0, y=0.0, z=0.0),
                angular_velocity_covariance=np.array(unknown, float),
                linear_acceleration=vector(x=0.0, y=0.0, z=0.0),
                linear_acceleration_covariance=np.array(unknown, float)))
            writer.write_image(IMAGE_TOPIC, stamp, view.image, frame_id='camera',
                               encoding='bgr8')
    partial.rename(path)
    return path


def run_live(out: Path, params: NodeParams, flight_bag: Path, replay_rate: float) -> Path:
    """
    Start the node as its own process, replay the flight into it, record what it says.

    params: the node's settings, written as its params file OUT/cvgl_demo.yaml; the bag is
    replayed at replay_rate times real time. Returns the recorded bag (OUT/live).
    """
    import rclpy
    from taco_cvgl.ros.bag_replay import BagPlayer, Recorder
    recorded = out / 'live'
    if recorded.exists():
        return recorded
    share = Path(__file__).resolve().parents[2] / 'config'
    env = dict(os.environ)
    profile = share / 'fastdds_shm.xml'
    if profile.is_file():
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(profile)
    params_file = out / 'cvgl_demo.yaml'
    from taco_cvgl.localization.settings import defaults_yaml
    params_file.write_text(defaults_yaml(params), encoding='utf-8')
    node_cmd = [sys.executable, '-m', 'taco_cvgl.ros.node', '--ros-args',
                '--params-file', str(params_file)]
    log_path = out / 'node.log'
    with open(log_path, 'w') as node_log:
        node = subprocess.Popen(node_cmd, stdout=node_log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_node(node, log_path)
        rclpy.init()
        ros_node = rclpy.create_node('taco_cvgl_demo')
        from rclpy.executors import SingleThreadedExecutor
        from taco_cvgl.ros.spinning import BackgroundSpinner
        executor = SingleThreadedExecutor()
        executor.add_node(ros_node)
        topics = {FIX_TOPIC: 'sensor_msgs/msg/NavSatFix', GT_TOPIC: 'sensor_msgs/msg/NavSatFix'}
        with BackgroundSpinner(executor), Recorder(ros_node, topics, recorded, storage='mcap'):
            player = BagPlayer(ros_node, flight_bag, qos='reliable')
            sent = player.play(rate=replay_rate, start_delay_s=2.0)
            time.sleep(3.0)  # the node's last answers are still on their way
        log(f'replayed {sent} messages; recorded the fixes of the node into {recorded}')
        executor.shutdown()
        ros_node.destroy_node()
        rclpy.try_shutdown()
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
    return recorded


def _wait_for_node(node: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise TacoError(f'the node exited with code {node.returncode}; its log: '
                            f'{log_path}\n{log_path.read_text()[-2000:]}')
        if 'ready' in log_path.read_text():
            return
        time.sleep(0.5)
    raise TacoError(f'the node did not report ready within {timeout_s:.0f} s; see {log_path}')
