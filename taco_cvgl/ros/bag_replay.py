"""
Play a rosbag2 into live ROS topics, and record live topics into a rosbag2.

Both move serialized (CDR) bytes without deserializing them: rclpy publishes ``bytes`` as they
are, and a subscription created with ``raw=True`` hands over the bytes it received. The message
class is needed only to tell the middleware the type, so any type whose Python message package
is installed can be replayed and recorded. With a clock rate, the player also publishes /clock
with the bag's time, as `ros2 bag play --clock` does, so nodes with use_sim_time follow the bag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import functools
import importlib
import os
import threading
import time
from typing import Any

import rclpy
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, qos_profile_sensor_data, QoSProfile,
                       ReliabilityPolicy)
from taco_cvgl.errors import InputError
from taco_cvgl.files import bags

# Reliable publishers keep this many messages per topic for late acknowledgements, so that a
# subscriber falling briefly behind during a fast replay loses nothing (payloads are allocated
# only while they are waiting, so the depth costs memory only when a subscriber lags).
RELIABLE_DEPTH = 50
# Longest wait at the end of a replay for reliable subscribers to acknowledge the last messages.
ACK_TIMEOUT_S = 2.0
# Longest single sleep while waiting for the next message's time (s): keeps Ctrl-C and shutdown
# responsive.
_SLEEP_SLICE_S = 0.05


def normalize_msgtype(msgtype: str) -> str:
    """Return 'pkg/msg/Type' for 'pkg/msg/Type' or 'pkg/Type'."""
    parts = msgtype.strip().split('/')
    if len(parts) == 2 and all(parts):
        return f'{parts[0]}/msg/{parts[1]}'
    if len(parts) == 3 and all(parts):
        return msgtype.strip()
    raise InputError(f'message type {msgtype!r} is not of the form package/msg/Type')


def message_class(msgtype: str) -> type:
    """Import the Python class of a ROS message type such as 'sensor_msgs/msg/Image'."""
    package, kind, name = normalize_msgtype(msgtype).split('/')
    try:
        module = importlib.import_module(f'{package}.{kind}')
        return getattr(module, name)
    except (ImportError, AttributeError) as err:
        raise InputError(f'message type {msgtype} is not installed ({err})') from None


def qos_profile(qos: str | QoSProfile) -> QoSProfile:
    """Return a QoSProfile for 'reliable' (REP-2003 drivers), 'best_effort' or a profile."""
    if isinstance(qos, QoSProfile):
        return qos
    if qos == 'reliable':
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=RELIABLE_DEPTH,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
    if qos in ('best_effort', 'sensor_data'):
        return qos_profile_sensor_data
    raise InputError(f'unknown QoS {qos!r}; use reliable or best_effort')


def _sleep_until(target: float, deadline: float | None, context: Any,
                 clock: BagClock | None = None) -> bool:
    """
    Sleep until monotonic time target; return False when stopped (deadline, shutdown).

    A clock publishes the bag's time at its rate meanwhile.
    """
    slice_s = _SLEEP_SLICE_S if clock is None else min(_SLEEP_SLICE_S, clock.period_s)
    while True:
        if not context.ok():
            return False
        now = time.monotonic()
        if clock is not None:
            clock.tick(now)
        if deadline is not None and now >= deadline:
            return False
        if now >= target:
            return True
        wake = target if deadline is None else min(target, deadline)
        time.sleep(min(slice_s, max(0.0, wake - now)))


class BagClock:
    """
    Publish /clock (rosgraph_msgs/Clock) with the bag's playback time, at a fixed rate.

    As `ros2 bag play --clock`: the time a message is published is its log time, and between
    messages the clock runs on from the last one at the playback rate. Each message's own time
    goes out just before it, so a node with use_sim_time never receives a message from its
    future.
    """

    def __init__(self, node: Node, hz: float) -> None:
        """Create the /clock publisher (reliable: it matches best-effort time sources too)."""
        from rosgraph_msgs.msg import Clock

        if not hz > 0:
            raise InputError(f'clock rate must be > 0 Hz, got {hz}')
        self._msg = Clock()
        self._publisher = node.create_publisher(Clock, '/clock', 10)
        self.period_s = 1.0 / hz
        self._anchor: tuple[float, int, float] | None = None  # monotonic s, bag ns, rate
        self._next_s = 0.0

    def publish(self, bag_ns: int, now: float, rate: float) -> None:
        """Publish bag time bag_ns now, and run on from it at rate (<= 0: hold it)."""
        self._anchor = (now, int(bag_ns), rate)
        self._send(int(bag_ns))
        self._next_s = now + self.period_s

    def tick(self, now: float) -> None:
        """Publish the running bag time when a period has passed since the last /clock."""
        if self._anchor is None or now < self._next_s:
            return
        start, bag_ns, rate = self._anchor
        self._send(bag_ns + int((now - start) * rate * 1e9) if rate > 0 else bag_ns)
        self._next_s = now + self.period_s

    def _send(self, bag_ns: int) -> None:
        self._msg.clock.sec, self._msg.clock.nanosec = divmod(bag_ns, 10**9)
        self._publisher.publish(self._msg)


def replay(bag_path: str | os.PathLike, rate: float = 1.0, topics: Iterable[str] | None = None,
           loop: bool = False, qos: str | QoSProfile = 'reliable',
           remap: Mapping[str, str] | None = None, start_delay_s: float = 0.5,
           node: Node | None = None, duration_s: float | None = None,
           clock_hz: float | None = None) -> int:
    """
    Publish a bag's messages on live topics following its log times; return how many.

    ``rate`` scales time (2.0 plays twice as fast; <= 0 publishes as fast as possible).
    ``topics`` None plays every topic. ``remap`` maps bag topic names to published names.
    ``start_delay_s`` waits after creating the publishers so subscribers discover them before
    the first message. ``loop`` restarts at the end until shutdown or ``duration_s`` (seconds
    of wall time, None: no limit). Without ``node`` a node is created (initialising rclpy if
    needed) and destroyed afterwards. Topics whose message package is not installed are
    skipped with a warning naming them. ``clock_hz`` publishes /clock with the bag's time at
    that rate (see :class:`BagClock`); None: no /clock.
    """
    own_init = node is None and not rclpy.ok()
    if own_init:
        rclpy.init()
    own_node = node is None
    if node is None:
        node = rclpy.create_node('taco_cvgl_replay')
    try:
        player = BagPlayer(node, bag_path, topics=topics, qos=qos, remap=remap,
                           clock_hz=clock_hz)
        return player.play(rate=rate, loop=loop, start_delay_s=start_delay_s,
                           duration_s=duration_s)
    finally:
        if own_node:
            node.destroy_node()
        if own_init:
            rclpy.try_shutdown()


class BagPlayer:
    """
    Publishers for a bag's topics on a node, and the loop that plays the bag through them.

    ``published`` counts the messages sent so far, also when playing stops by an exception
    such as KeyboardInterrupt.
    """

    def __init__(self, node: Node, bag_path: str | os.PathLike,
                 topics: Iterable[str] | None = None, qos: str | QoSProfile = 'reliable',
                 remap: Mapping[str, str] | None = None, clock_hz: float | None = None) -> None:
        """Check the topics and create one publisher per topic (and /clock, see :func:`replay`)."""
        self.node = node
        self.bag_path = bag_path
        self.published = 0
        available = bags.list_topics(bag_path)
        wanted = sorted(available) if topics is None else list(topics)
        bags.require_topics(bag_path, available, wanted)
        profile = qos_profile(qos)
        remap = dict(remap or {})
        self.publishers: dict[str, Any] = {}
        self.not_installed: list[str] = []
        for topic in wanted:
            try:
                cls = message_class(available[topic])
            except InputError:
                self.not_installed.append(f'{topic} ({available[topic]})')
                continue
            self.publishers[topic] = node.create_publisher(cls, remap.get(topic, topic), profile)
        if self.not_installed:
            node.get_logger().warning(
                'not replaying topics whose message package is not installed: '
                + ', '.join(self.not_installed))
        if not self.publishers:
            raise InputError(f'bag {bag_path}: none of the topics to replay has an installed '
                             f'message type ({", ".join(self.not_installed)})')
        self.clock = None if clock_hz is None else BagClock(node, clock_hz)

    def play(self, rate: float = 1.0, loop: bool = False, start_delay_s: float = 0.5,
             duration_s: float | None = None) -> int:
        """Play the bag (see :func:`replay`); return the number of messages published."""
        context = self.node.context
        start = time.monotonic()
        deadline = None if duration_s is None else start + duration_s
        if self.clock is not None:  # held at the bag's start during the delay, as ros2 bag play
            self.clock.publish(self._first_log_ns(), start, 0.0)
        if not _sleep_until(start + max(0.0, start_delay_s), deadline, context, self.clock):
            return self.published
        while True:
            first_log_ns = None
            pass_start = time.monotonic()
            messages = bags.iter_raw(self.bag_path, list(self.publishers))
            for topic, _msgtype, log_ns, data in messages:
                if first_log_ns is None:
                    first_log_ns, pass_start = log_ns, time.monotonic()
                # Absolute targets: time spent reading and publishing does not accumulate.
                target = pass_start + (log_ns - first_log_ns) / 1e9 / rate if rate > 0 else 0.0
                if not _sleep_until(target, deadline, context, self.clock):
                    return self.published
                if self.clock is not None:
                    self.clock.publish(log_ns, time.monotonic(), rate)
                self.publishers[topic].publish(data)
                self.published += 1
            if not loop or first_log_ns is None:
                self.wait_for_acks()
                return self.published

    def _first_log_ns(self) -> int:
        """Return the log time of the first message played (0 for an empty bag)."""
        messages = bags.iter_raw(self.bag_path, list(self.publishers))
        try:
            return next((log_ns for _, _, log_ns, _ in messages), 0)
        finally:
            messages.close()

    def wait_for_acks(self, timeout_s: float = ACK_TIMEOUT_S) -> bool:
        """
        Wait until reliable subscribers acknowledged every message; False on timeout.

        Destroying the node right after the last publish could otherwise cut off the last
        messages to a subscriber that is still catching up.
        """
        deadline = time.monotonic() + timeout_s
        for publisher in self.publishers.values():
            left = max(0.0, deadline - time.monotonic())
            if not publisher.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))):
                return False
        return True


class Recorder:
    """
    Record live topics into a bag (MCAP or sqlite3), stamping each message's receive time.

    ``topics`` maps topic names to message types ('sensor_msgs/msg/NavSatFix'). Subscriptions are
    raw, so messages are written exactly as received. The bag appears at ``out_path`` on
    ``close()`` (see :class:`taco_cvgl.files.bags.BagWriter`). ``qos`` 'reliable' (default) matches
    reliable publishers only and loses nothing; 'best_effort' matches any publisher but may
    drop messages (large images over shared memory in particular).
    """

    def __init__(self, node: Node, topics: Mapping[str, str], out_path: str | os.PathLike,
                 storage: str = 'mcap', qos: str | QoSProfile = 'reliable') -> None:
        """Subscribe to every topic and open the bag."""
        if not topics:
            raise InputError('no topics to record')
        self._node = node
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        profile = qos_profile(qos)
        classes = {topic: (normalize_msgtype(t), message_class(t)) for topic, t in topics.items()}
        self._writer: bags.BagWriter | None = bags.BagWriter(out_path, storage)
        self.out_path = self._writer.path
        self._subscriptions = []
        try:
            for topic, (msgtype, cls) in classes.items():
                # The bag gets the fully resolved name (namespace and remapping applied), known
                # once the subscription exists; no callback runs before this constructor returns
                # unless another thread already spins the node, hence the lock in the callback.
                target = {'topic': topic, 'msgtype': msgtype}
                with self._lock:
                    sub = node.create_subscription(
                        cls, topic, functools.partial(self._on_message, target), profile,
                        raw=True)
                    target['topic'] = sub.topic_name
                    self._writer.add_topic(sub.topic_name, msgtype)
                    self.counts[sub.topic_name] = 0
                    self._subscriptions.append(sub)
        except BaseException:
            self.abort()
            raise

    @property
    def count(self) -> int:
        """Return how many messages have been recorded."""
        return sum(self.counts.values())

    def _on_message(self, target: dict[str, str], data: bytes) -> None:
        """Write one received message with the node's current time as log time."""
        received_ns = self._node.get_clock().now().nanoseconds
        with self._lock:
            if self._writer is None:
                return
            self._writer.write_raw(target['topic'], target['msgtype'], received_ns, data)
            self.counts[target['topic']] += 1

    def _unsubscribe(self) -> None:
        """Destroy the subscriptions."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            try:
                self._node.destroy_subscription(sub)
            except Exception:  # noqa: BLE001 - after a shutdown (Ctrl-C) the node is gone too
                pass

    def close(self) -> None:
        """Stop recording and finish the bag at out_path."""
        self._unsubscribe()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def abort(self) -> None:
        """Stop recording and discard the bag."""
        self._unsubscribe()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()

    def __enter__(self) -> Recorder:
        """Return self."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close (keeping what was recorded, even after an error)."""
        self.close()
