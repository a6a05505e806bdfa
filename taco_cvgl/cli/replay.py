"""
taco-cvgl replay: play a rosbag2 into live ROS topics, optionally recording topics meanwhile.

Typical use, scoring the node on a bag: replay the camera topic into a running node and record
its estimates (here into the bag run1), then score the recorded bag against the bag's ground
truth::

    taco-cvgl replay drive.mcap --topics /camera/image_raw --record run1
        --record-topics /cvgl/fix:sensor_msgs/msg/NavSatFix
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Optional

from taco_cvgl.cli.common import reports_errors
from taco_cvgl.errors import InputError
from taco_cvgl.ros.params import split_ros_args

# Rate of /clock for --clock without one (Hz): the default of `ros2 bag play --clock`.
DEFAULT_CLOCK_HZ = 40.0


def _parse_pairs(items: list, sep: str, what: str) -> dict:
    """Split 'A<sep>B' items into {A: B}, raising InputError on a malformed item."""
    pairs = {}
    for item in items or []:
        left, found, right = item.partition(sep)
        if not found or not left or not right:
            raise InputError(f'{what} {item!r} is not of the form A{sep}B')
        pairs[left] = right
    return pairs


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `taco-cvgl replay`."""
    parser = argparse.ArgumentParser(
        prog='taco-cvgl replay',
        description='Play a rosbag2 (MCAP or sqlite3) into live ROS topics following its log '
                    'times; optionally record live topics into a new bag meanwhile. Extra ROS '
                    'arguments go after --ros-args.')
    parser.add_argument('bag', help='rosbag2 directory, .mcap or .db3 file to play')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed factor; 0 or less plays as fast as possible '
                             '(default 1.0)')
    parser.add_argument('--topics', nargs='+', metavar='TOPIC',
                        help='bag topics to play (default: all)')
    parser.add_argument('--loop', action='store_true', help='restart at the end of the bag')
    parser.add_argument('--qos', choices=('reliable', 'best_effort'), default='reliable',
                        help='publisher reliability (default reliable, as REP-2003 drivers)')
    parser.add_argument('--remap', nargs='+', metavar='FROM:=TO', default=[],
                        help='publish bag topic FROM under the name TO')
    parser.add_argument('--start-delay', type=float, default=0.5, metavar='S',
                        help='seconds to wait after creating publishers so that subscribers '
                             'discover them (default 0.5)')
    parser.add_argument('--clock', type=float, nargs='?', const=DEFAULT_CLOCK_HZ, metavar='HZ',
                        help="publish /clock with the bag's time at HZ (default 40), as ros2 "
                             'bag play --clock does, for nodes run with use_sim_time:=true '
                             '(give it after the bag)')
    parser.add_argument('--duration', type=float, metavar='S',
                        help='stop replaying and recording after S seconds of wall time')
    parser.add_argument('--record', metavar='OUT',
                        help='record --record-topics into a new bag at OUT while replaying')
    parser.add_argument('--record-topics', nargs='+', metavar='TOPIC:TYPE', default=[],
                        help='topics to record with their types, e.g. '
                             '/cvgl/fix:sensor_msgs/msg/NavSatFix')
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap',
                        help='storage format of the recorded bag (default mcap)')
    parser.add_argument('--tail', type=float, default=2.0, metavar='S',
                        help='keep recording S seconds after the last replayed message, for '
                             'outputs still in flight (default 2.0)')
    return parser


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Run `taco-cvgl replay`; return the exit code (2 with a message on bad input)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from taco_cvgl.ros.bag_replay import BagPlayer, Recorder
    from taco_cvgl.ros.spinning import BackgroundSpinner

    argv = list(sys.argv[1:] if argv is None else argv)
    own_argv, ros_argv = split_ros_args(argv)
    args = build_parser().parse_args(own_argv)
    remap = _parse_pairs(args.remap, ':=', '--remap')
    record_topics = _parse_pairs(args.record_topics, ':', '--record-topics')
    if args.record and not record_topics:
        raise InputError('--record needs --record-topics TOPIC:TYPE ...')
    if record_topics and not args.record:
        raise InputError('--record-topics needs --record OUT')
    if args.clock is not None and not args.clock > 0:
        raise InputError(f'--clock {args.clock}: the rate must be above 0 Hz (e.g. --clock 40)')

    # Stop on SIGTERM (what process managers send) as on Ctrl-C: the recording is finished, not
    # left as a partial bag.
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    context = rclpy.Context()
    rclpy.init(args=['taco-cvgl'] + ros_argv, context=context)
    node = rclpy.create_node('taco_cvgl_replay', context=context)
    executor = SingleThreadedExecutor(context=context)
    recorder = None
    spinner = None
    started = time.monotonic()
    try:
        # The player checks the bag and its topics first: a mistake there leaves no empty bag.
        player = BagPlayer(node, args.bag, topics=args.topics, qos=args.qos, remap=remap,
                           clock_hz=args.clock)
        if args.record:
            recorder = Recorder(node, record_topics, args.record, storage=args.storage)
            executor.add_node(node)
            spinner = BackgroundSpinner(executor).start()
        try:
            player.play(rate=args.rate, loop=args.loop, start_delay_s=args.start_delay,
                        duration_s=args.duration)
            if recorder is not None:
                tail_end = time.monotonic() + args.tail
                if args.duration is not None:
                    tail_end = min(tail_end, started + args.duration)
                while context.ok() and time.monotonic() < tail_end:
                    time.sleep(0.05)
        except KeyboardInterrupt:
            print('taco-cvgl replay: stopped by a signal (Ctrl-C or SIGTERM)', file=sys.stderr)
        print(f'published {player.published} messages from {args.bag}')
        if recorder is not None:
            recorder.close()
            print(f'recorded {recorder.count} messages into {recorder.out_path}')
        return 0
    finally:
        if recorder is not None:
            recorder.close()  # keeps what was recorded when replay failed; no-op when closed
        if spinner is not None:
            spinner.stop()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _raise_keyboard_interrupt(signum, frame) -> None:
    """Turn a signal into KeyboardInterrupt in the main thread."""
    raise KeyboardInterrupt


if __name__ == '__main__':
    sys.exit(main())
