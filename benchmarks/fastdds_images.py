#!/usr/bin/env python3
"""
Benchmark: camera images between two processes, Fast DDS defaults against config/fastdds_shm.xml.

Why the profile exists, measured rather than asserted: a publisher process sends --count images
(640x480 rgb8 unless --sizes says otherwise) at --rate-hz over SensorDataQoS (best effort), as a
camera driver does; a subscriber process on the same machine counts what arrives. Each trial runs
once with Fast DDS' defaults (no profile variable set) and once with FASTDDS_DEFAULT_PROFILES_FILE
set to config/fastdds_shm.xml, each pair of processes on a domain and topic of its own, started in
an empty folder (Fast DDS also reads a DEFAULT_FASTDDS_PROFILES.xml found in the working folder).
The two settings alternate, in turn first, over --repeats repetitions so that other work on a
shared machine affects both alike; the median per setting is printed with every run's count.

The subscriber keeps a history as deep as --count, so a process short of CPU loses no image to its
own queue: what is missing was lost in transport. The figures belong to the machine, its load and
the RMW and Fast DDS versions printed with them (taken from the subscriber process: the RMW it runs
and the Fast DDS library it has loaded).

    python benchmarks/fastdds_images.py                     # 5 repetitions of 40 images, 640x480
    python benchmarks/fastdds_images.py --sizes 640x480 320x240 --repeats 7 --json fastdds.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple
import xml.etree.ElementTree as ET

from taco_cvgl.cli.common import reports_errors
from taco_cvgl.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / 'config' / 'fastdds_shm.xml'
PROFILE_VARIABLES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
FASTDDS_RMWS = ('rmw_fastrtps_cpp', 'rmw_fastrtps_dynamic_cpp')
SETTINGS = ('defaults', 'profile')
MATCH_TIMEOUT_S = 60.0

# Subscriber: argv topic, depth. Counts images until its stdin closes, then prints one JSON line
# with the count, the RMW and the Fast DDS shared library this process has mapped.
SUBSCRIBER = r"""
import glob, json, os, sys, threading
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.utilities import get_rmw_implementation_identifier
from sensor_msgs.msg import Image

rclpy.init()
node = rclpy.create_node('fastdds_bench_sub')
count = [0]
qos = QoSProfile(depth=int(sys.argv[2]), reliability=ReliabilityPolicy.BEST_EFFORT)
node.create_subscription(Image, sys.argv[1], lambda msg: count.__setitem__(0, count[0] + 1), qos)
stdin_open = threading.Thread(target=sys.stdin.read, daemon=True)
stdin_open.start()
while stdin_open.is_alive():
    rclpy.spin_once(node, timeout_sec=0.05)
# The Fast DDS library this process has mapped, by its soname (libfastdds.so.3.2); the full
# version is that of the longest-named file of the same library beside it (libfastdds.so.3.2.2).
version = None
with open('/proc/self/maps') as maps:
    for line in maps:
        path = os.path.realpath(line.split()[-1])
        if os.path.basename(path).startswith(('libfastdds.so.', 'libfastrtps.so.')):
            name = max(glob.glob(path + '*'), key=len)
            version = os.path.basename(name).split('.so.', 1)[1]
print(json.dumps({'received': count[0], 'rmw': get_rmw_implementation_identifier(),
                  'fastdds': version}), flush=True)
"""

# Publisher: argv topic, count, width, height, rate. Waits for the subscriber, sends the images,
# prints one JSON line with the number of subscriptions it had matched.
PUBLISHER = r"""
import json, sys, time
import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

topic, count, width, height, rate = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5])
rclpy.init()
node = rclpy.create_node('fastdds_bench_pub')
pub = node.create_publisher(Image, topic, qos_profile_sensor_data)
deadline = time.monotonic() + float(sys.argv[6])
while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
matched = pub.get_subscription_count()
time.sleep(0.5)  # discovery also has to finish on the subscriber's side
msg = Image(height=height, width=width, encoding='rgb8', step=3 * width,
            data=bytes(3 * width * height))
msg.header.frame_id = 'camera'
for _ in range(count if matched else 0):
    pub.publish(msg)
    time.sleep(1.0 / rate)
print(json.dumps({'matched': matched}), flush=True)
"""


def parse_size(text: str) -> Tuple[int, int]:
    """Return (width, height) of a WIDTHxHEIGHT argument."""
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not WIDTHxHEIGHT, e.g. 640x480')
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f'{text!r}: width and height must be positive')
    return width, height


def probe_env(setting: str) -> dict:
    """Return the environment of a probe process: Fast DDS defaults, or our profile."""
    env = dict(os.environ, ROS_DOMAIN_ID=str(random.SystemRandom().randint(1, 100)),
               PYTHONUNBUFFERED='1')
    for name in PROFILE_VARIABLES:
        env.pop(name, None)
    if setting == 'profile':
        env[PROFILE_VARIABLES[0]] = str(PROFILE)
    return env


def last_json(output: str) -> dict:
    """Return the JSON line a probe process printed last."""
    lines = output.strip().splitlines()
    if not lines:
        raise RuntimeError('a probe process ended without a result')
    return json.loads(lines[-1])


def run_trial(setting: str, size: Tuple[int, int], count: int, rate_hz: float,
              workdir: str) -> dict:
    """Send `count` images from one process to another; return what arrived and the versions."""
    env = probe_env(setting)
    topic = f'fastdds_bench_{os.getpid()}_{random.SystemRandom().randrange(10 ** 9)}'
    popen = {'env': env, 'cwd': workdir, 'text': True, 'stdout': subprocess.PIPE,
             'stderr': subprocess.DEVNULL}
    sub = subprocess.Popen([sys.executable, '-c', SUBSCRIBER, topic, str(count)],
                           stdin=subprocess.PIPE, **popen)
    pub = subprocess.Popen([sys.executable, '-c', PUBLISHER, topic, str(count), str(size[0]),
                            str(size[1]), str(rate_hz), str(MATCH_TIMEOUT_S)], **popen)
    try:
        sent = last_json(pub.communicate(timeout=MATCH_TIMEOUT_S + count / rate_hz + 60)[0])
        time.sleep(1.0)  # the last images in flight, before the subscriber is told to stop
        got = last_json(sub.communicate('', timeout=60)[0])
    finally:
        for proc in (pub, sub):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if not sent['matched']:
        raise RuntimeError(f'the publisher never matched its subscriber ({setting})')
    return {'setting': setting, 'width': size[0], 'height': size[1], 'sent': count, **got}


def package_version(name: str) -> Optional[str]:
    """Return the version in a ROS package's package.xml (None where it is not installed)."""
    prefixes = [*filter(None, os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep)),
                sys.prefix]   # a ROS installed into this Python environment sets no variable
    for prefix in prefixes:
        manifest = Path(prefix) / 'share' / name / 'package.xml'
        if manifest.is_file():
            return ET.parse(manifest).getroot().findtext('version')
    return None


def machine() -> dict:
    """Describe where the figures come from: OS, CPUs, load, Python and the date."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    return {'platform': platform.platform(), 'cpu_cores': os.cpu_count(), 'load_average': load,
            'python': platform.python_version(), 'ros_distro': os.environ.get('ROS_DISTRO'),
            'rclpy': package_version('rclpy'),
            'rmw_fastrtps_cpp': package_version('rmw_fastrtps_cpp'),
            'date': datetime.date.today().isoformat()}


def measure(sizes: List[Tuple[int, int]], count: int, repeats: int, rate_hz: float) -> dict:
    """Run every setting and size `repeats` times, alternating the order; print each run."""
    runs = []
    with tempfile.TemporaryDirectory(prefix='fastdds_bench_') as workdir:
        for rep in range(repeats):
            order = SETTINGS if rep % 2 == 0 else SETTINGS[::-1]
            for size in sizes:
                for setting in order:
                    run = run_trial(setting, size, count, rate_hz, workdir)
                    runs.append(run)
                    print(f'run {rep + 1}/{repeats} {size[0]}x{size[1]} {setting:>8}: '
                          f'{run["received"]}/{count}', flush=True)
    return {'runs': runs, 'summary': summarize(runs, sizes)}


def summarize(runs: List[dict], sizes: List[Tuple[int, int]]) -> List[dict]:
    """Return the median and every count per size and setting."""
    rows = []
    for width, height in sizes:
        for setting in SETTINGS:
            counts = [r['received'] for r in runs if r['setting'] == setting
                      and (r['width'], r['height']) == (width, height)]
            rows.append({'width': width, 'height': height, 'setting': setting,
                         'median': statistics.median(counts), 'counts': counts})
    return rows


def versions(runs: List[dict]) -> Dict[str, Optional[str]]:
    """Return the RMW and Fast DDS version the subscriber processes reported."""
    return {'rmw': ', '.join(sorted({str(r['rmw']) for r in runs})),
            'fastdds': ', '.join(sorted({str(r['fastdds']) for r in runs}))}


def check_rmw() -> None:
    """Refuse to run where the selected middleware is not Fast DDS (it ignores the profile)."""
    rmw = os.environ.get('RMW_IMPLEMENTATION', '')
    if rmw and rmw not in FASTDDS_RMWS:
        raise InputError(f'RMW_IMPLEMENTATION is {rmw}: this benchmark measures Fast DDS '
                         f'({" or ".join(FASTDDS_RMWS)})')
    if not PROFILE.is_file():
        raise InputError(f'{PROFILE}: not found (run from a source checkout)')


@reports_errors
def main(argv=None) -> int:
    """Measure both settings, print the medians with the versions, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--count', type=int, default=40, help='images sent per run')
    parser.add_argument('--repeats', type=int, default=5, help='runs per setting and size')
    parser.add_argument('--rate-hz', type=float, default=20.0, help='publishing rate')
    parser.add_argument('--sizes', type=parse_size, nargs='+', default=[(640, 480)],
                        metavar='WxH', help='rgb8 image sizes (default 640x480)')
    parser.add_argument('--json', type=Path, help='also write the runs to this file')
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeats < 1 or args.rate_hz <= 0:
        raise InputError('--count and --repeats must be >= 1 and --rate-hz > 0')
    check_rmw()
    result = measure(args.sizes, args.count, args.repeats, args.rate_hz)
    result.update(versions(result['runs']), machine=machine(), count=args.count,
                  rate_hz=args.rate_hz, schema='taco_cvgl.fastdds_images/1')
    info = result['machine']
    print(f'{result["rmw"]} {info["rmw_fastrtps_cpp"]}, Fast DDS {result["fastdds"]}, '
          f'rclpy {info["rclpy"]}, {info["cpu_cores"]} CPUs, load {info["load_average"]}')
    for row in result['summary']:
        name = 'Fast DDS defaults' if row['setting'] == 'defaults' else PROFILE.name
        print(f'{row["width"]}x{row["height"]} {name:>17}: median {row["median"]:g}/{args.count}'
              f' received (runs: {" ".join(map(str, row["counts"]))})')
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
