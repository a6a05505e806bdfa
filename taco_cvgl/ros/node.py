"""
cvgl_node: camera images in, GPS fixes out. A thin adapter over `CVGLLocalizer`.

Subscriptions only store the newest message of each camera (overwriting one not yet processed
counts as a dropped frame), so the node never builds a queue when the model is slower than the
cameras. A worker thread takes the newest frame of every camera that has one, decodes them,
localizes them in one batch on the device and publishes, stamped with each image's time:
sensor_msgs/NavSatFix and geographic_msgs/GeoPoseWithCovarianceStamped (and, with imu_topic, an
orientation-only sensor_msgs/Imu of the heading), plus diagnostic_msgs/DiagnosticArray on
/diagnostics.

With orientation_topic set, the robot's orientation (sensor_msgs/Imu or
geometry_msgs/QuaternionStamped, see taco_cvgl.orientation) is kept by stamp and each image gets
the heading prior nearest its own stamp (within orientation_max_age_s). A frame without one (no
message yet, none near its time, only messages without a usable heading) is localized without a
prior, never dropped; /diagnostics counts both kinds of frame and the refused messages.

Thresholds, verification and track settings change at run time (`ros2 param set`; the table in
taco_cvgl/settings.py marks them): the callback checks a change and the worker applies it
between batches, as it does `~/reset_track` (std_srvs/Trigger), which forgets the motion track
(after the robot was carried elsewhere).

Run: ros2 run taco_cvgl cvgl_node --ros-args --params-file config/cvgl.yaml -p weights:=W
-p database:=D (or python -m taco_cvgl.ros.node ...). Parameters: taco_cvgl/ros/params.py.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import List, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import QuaternionStamped
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, Imu, NavSatFix
from taco_cvgl.errors import InputError, TacoError
from taco_cvgl.image_codec import decode_msg, OversizedImageError
from taco_cvgl.orientation import message_prior, OrientationBuffer
from taco_cvgl.ros import messages
from taco_cvgl.ros.params import declare, updated
from taco_cvgl.settings import localizer_config, NodeParams

NODE_NAME = 'cvgl_node'
WARN_THROTTLE_S = 5.0  # at most one warning of a kind per this many seconds
# Orientation messages come at IMU rates, many per frame: a deeper queue than the images'.
ORIENTATION_QOS_DEPTH = 50


@dataclasses.dataclass
class Counters:
    """What the diagnostics report; counts are totals since start."""

    received: int = 0
    dropped: int = 0
    bad: int = 0        # skipped messages, the oversized ones included
    oversized: int = 0  # skipped because their header claims more than max_image_pixels
    errors: int = 0
    localized: int = 0
    fixes: int = 0
    latencies_s: List[float] = dataclasses.field(default_factory=list)  # since last report
    confidence: float = float('nan')
    orientations: int = 0         # orientation messages received
    bad_orientations: int = 0     # of those, refused: no usable heading in them
    with_prior: int = 0           # localized frames given a heading prior from the topic
    without_prior: int = 0        # localized frames without one although the topic is set
    no_prior_reason: str = ''     # why the latest of those had none

    def count_bad(self, exc: Exception) -> None:
        """Count a skipped message; oversized ones apart too (a hostile camera, not a glitch)."""
        self.bad += 1
        self.oversized += isinstance(exc, OversizedImageError)

    def problems(self, last: 'Counters') -> List[str]:
        """Return the warnings since the report whose counters were `last`."""
        problems = []
        if self.received == last.received:
            problems.append('no images')
        if self.bad > last.bad:
            oversized = self.oversized - last.oversized
            problems.append(f'{self.bad - last.bad} bad image message(s)' + (
                f' ({oversized} over max_image_pixels)' if oversized else ''))
        if self.localized > last.localized and self.fixes == last.fixes:
            problems.append('no fix: confidence below min_confidence')
        if self.bad_orientations > last.bad_orientations:
            problems.append(f'{self.bad_orientations - last.bad_orientations} bad orientation '
                            f'message(s)')
        if self.without_prior > last.without_prior:
            problems.append(f'{self.without_prior - last.without_prior} frame(s) without a '
                            f'heading prior ({self.no_prior_reason})')
        return problems


class CVGLNode(Node):
    """Subscribe to the cameras, localize their newest frames in batches, publish fixes."""

    def __init__(self, argv: Optional[List[str]] = None, **kwargs):
        """
        Declare parameters, load model and database (fail fast), start the worker.

        argv: the command line given to rclpy.init (None: sys.argv, as there), so that a value
        rcl could not apply is refused rather than ignored.
        """
        super().__init__(NODE_NAME, **kwargs)
        try:
            self._start([*(sys.argv if argv is None else argv), *(kwargs.get('cli_args') or ())])
        except BaseException:
            # A half-built node left to the garbage collector is freed after rclpy's shutdown,
            # which can crash the process (SIGSEGV) instead of the clean exit code 1.
            self.destroy_node()
            raise

    def _start(self, argv: List[str]) -> None:
        """Check and declare the parameters, load model and map, open the topics, start work."""
        self.params = declare(self, argv)
        from taco_cvgl.localizer import CVGLLocalizer   # torch: after the parameter checks
        self.localizer = CVGLLocalizer.from_settings(self.params)
        p = self.params
        self._geopose_type = messages.geopose_type()
        if self._geopose_type is None:
            self.get_logger().warning(
                'geographic_msgs is not installed: publishing NavSatFix only (install '
                'ros-$ROS_DISTRO-geographic-msgs for the GeoPose with heading)')
        self._fix_pub = self.create_publisher(NavSatFix, p.fix_topic, 10)
        self._geopose_pub = (self.create_publisher(self._geopose_type, p.geopose_topic, 10)
                             if self._geopose_type else None)
        self._imu_pub = self.create_publisher(Imu, p.imu_topic, 10) if p.imu_topic else None
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        qos = QoSProfile(depth=p.qos_depth, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.VOLATILE,
                         reliability=ReliabilityPolicy.BEST_EFFORT
                         if p.qos_reliability == 'best_effort' else ReliabilityPolicy.RELIABLE)
        compressed = p.image_transport == 'compressed'
        self._topics = [self.resolve_topic_name(t) + ('/compressed' if compressed else '')
                        for t in p.image_topics]
        self._cond = threading.Condition()
        self._latest: List[Optional[tuple]] = [None] * len(self._topics)
        self._pending: Optional[NodeParams] = None  # checked run-time changes, for the worker
        self._reset_requested = False
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._create_reset_service()
        self._counters = Counters()
        self._reported = (time.monotonic(), Counters())
        for index, topic in enumerate(self._topics):
            self.create_subscription(CompressedImage if compressed else Image, topic,
                                     lambda msg, i=index: self._store(i, msg), qos)
        self._orientation = OrientationBuffer()
        self._orientation_topic = self._subscribe_orientation(p, qos)
        self.create_timer(p.diagnostics_period_s, self._publish_diagnostics)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name='cvgl_worker', daemon=True)
        self._worker.start()
        model = self.localizer.model
        fast = getattr(model, '_fast', None)
        if fast is not None and fast.fallback_reason:
            self.get_logger().warning(f'fast path: fell back to {fast.backend} '
                                      f'({fast.fallback_reason})')
        self.get_logger().info(
            f'ready: {len(self.localizer.database)} places, model on {model.device} '
            f'({model.precision}, fast path {self._fast_path()}), cameras {self._topics}, '
            f'publishing {p.fix_topic}' + (f' and {p.geopose_topic}' if self._geopose_pub else '')
            + (f' and {p.imu_topic}' if self._imu_pub else '')
            + (f', heading prior from {self._orientation_topic} ({p.orientation_type})'
               if self._orientation_topic else ''))

    def _subscribe_orientation(self, p: NodeParams, image_qos: QoSProfile) -> str:
        """Subscribe to orientation_topic (best effort like the images); return it resolved."""
        if not p.orientation_topic:
            return ''
        topic = self.resolve_topic_name(p.orientation_topic)   # checked by check_topics
        qos = QoSProfile(depth=ORIENTATION_QOS_DEPTH, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.VOLATILE,
                         reliability=image_qos.reliability)
        msg_type = Imu if p.orientation_type == 'imu' else QuaternionStamped
        self.create_subscription(msg_type, topic, self._store_orientation, qos)
        return topic

    def _create_reset_service(self) -> None:
        """Offer ~/reset_track where std_srvs is installed; warn and go without it elsewhere."""
        try:
            from std_srvs.srv import Trigger
        except ImportError:
            self.get_logger().warning(
                'std_srvs is not installed: no ~/reset_track service (install '
                'ros-$ROS_DISTRO-std-srvs)')
            return
        self.create_service(Trigger, '~/reset_track', self._on_reset_track)

    def _on_reset_track(self, request, response):
        """Ask the worker to forget the motion track before its next batch."""
        with self._cond:
            self._reset_requested = True
            self._cond.notify()
        response.success = True
        response.message = 'motion track reset: the next verified fix starts a new one'
        return response

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Check a run-time change against the table; the worker applies it between batches."""
        with self._cond:
            base = self._pending or self.params
        try:
            new = updated(base, parameters)
        except InputError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._cond:
            self._pending = new
            self._cond.notify()
        return SetParametersResult(successful=True)

    def _apply_pending(self) -> None:
        """
        Apply checked parameter changes and a track reset (worker thread, between batches).

        Under the lock, so that a change checked meanwhile builds on these values.
        """
        with self._cond:
            params, self._pending = self._pending, None
            reset, self._reset_requested = self._reset_requested, False
            if params is not None:
                self.localizer.reconfigure(localizer_config(params))
                changed = [f'{name}={value}' for name, value in dataclasses.asdict(params).items()
                           if value != getattr(self.params, name)]
                self.params = params
            if reset:
                self.localizer.track.reset()
        if params is not None:
            self.get_logger().info(f'parameters changed: {", ".join(changed) or "none"}')
        if reset:
            self.get_logger().info('motion track reset')

    def _fast_path(self) -> str:
        """Return the inference backend in use: 'off' (eager model) or the fast path's name."""
        fast = getattr(self.localizer.model, '_fast', None)
        return 'off' if fast is None else fast.backend

    def stop(self) -> None:
        """Stop the worker thread (the current batch finishes first)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._worker.join(timeout=30.0)

    # ------------------------------------------------------------------ subscriber side
    def _store(self, index: int, msg) -> None:
        """Keep the newest message of a camera; never blocks on the model."""
        with self._cond:
            self._counters.received += 1
            if self._latest[index] is not None:
                self._counters.dropped += 1
            self._latest[index] = (msg, time.monotonic())
            self._cond.notify()

    def _store_orientation(self, msg) -> None:
        """
        Keep an orientation message's heading prior by its stamp; count and log a refused one.

        An unstamped message (stamp 0) takes its arrival time. The sigma of a message that gives
        none is orientation_sigma_deg as set when the message arrives.
        """
        p = self.params
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        if stamp == 0:
            stamp = self.get_clock().now().nanoseconds
        prior, reason = message_prior(msg, p.orientation_type, p.orientation_sigma_deg)
        with self._cond:
            self._counters.orientations += 1
            if prior is None:
                self._counters.bad_orientations += 1
            else:
                self._orientation.add(stamp, prior)
        if prior is None:
            self.get_logger().warning(f'{self._orientation_topic}: ignored an orientation '
                                      f'message: {reason}', throttle_duration_sec=WARN_THROTTLE_S)

    # ------------------------------------------------------------------ worker side
    def _run(self) -> None:
        """Take the newest frame of each camera, localize them as one batch, repeat."""
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._stop.is_set() or any(self._latest)
                                    or self._pending is not None or self._reset_requested, 0.5)
            self._apply_pending()
            with self._cond:
                frames = [(i, f) for i, f in enumerate(self._latest) if f is not None]
                self._latest = [None] * len(self._latest)
            if not frames:
                continue
            rate = self.params.max_rate_hz
            min_interval = 1.0 / rate if rate > 0 else 0.0
            started = time.monotonic()
            try:
                self._process(frames)
            except Exception as exc:  # noqa: B902 - the node must outlive a failed batch
                with self._cond:
                    self._counters.errors += 1
                self.get_logger().error(f'localization failed: {type(exc).__name__}: {exc}',
                                        throttle_duration_sec=WARN_THROTTLE_S)
            self._stop.wait(max(0.0, started + min_interval - time.monotonic()))

    def _process(self, frames) -> None:
        """Decode, localize in one batch, publish; bad messages are counted and skipped."""
        images, good = [], []
        for index, (msg, received) in frames:
            try:
                images.append(decode_msg(msg, self.params.max_image_pixels))
            except Exception as exc:  # noqa: B902 - any undecodable message is a bad message
                with self._cond:
                    self._counters.count_bad(exc)
                self.get_logger().warning(f'{self._topics[index]}: skipped a bad image: {exc}',
                                          throttle_duration_sec=WARN_THROTTLE_S)
                continue
            good.append((index, msg, received))
        if not good:
            return
        yaws = [self.params.camera_yaws_deg[i] for i, _, _ in good]
        stamps = [m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec for _, m, _ in good]
        matched = self._heading_priors([m.header.stamp for _, m, _ in good])
        results = self.localizer.localize_batch(
            images, stamps, yaws, headings=[prior for prior, _ in matched] or None)
        self._count_priors(matched, results)
        for (_, msg, received), measurement in zip(good, results):
            self._publish(measurement, msg.header.stamp)
            with self._cond:
                self._counters.localized += 1
                self._counters.fixes += int(measurement.fix)
                self._counters.confidence = measurement.confidence
                self._counters.latencies_s.append(time.monotonic() - received)

    def _heading_priors(self, stamps) -> list:
        """Return (prior or None, reason) of each image stamp; [] without orientation_topic."""
        if not self._orientation_topic:
            return []
        max_age_s = self.params.orientation_max_age_s
        with self._cond:
            return [self._orientation.prior_at(s.sec * 10**9 + s.nanosec, max_age_s)
                    for s in stamps]

    def _count_priors(self, matched, results) -> None:
        """Count the frames localized with the topic's prior and without; log why one had none."""
        if not matched:
            return
        missing = [reason or 'the localizer did not use it'
                   for (_, reason), m in zip(matched, results) if m.heading_source != 'given']
        with self._cond:
            self._counters.with_prior += len(matched) - len(missing)
            self._counters.without_prior += len(missing)
            if missing:
                self._counters.no_prior_reason = missing[-1]
        if missing:
            self.get_logger().warning(f'localizing without a heading prior: {missing[-1]}',
                                      throttle_duration_sec=WARN_THROTTLE_S)

    def _publish(self, measurement, stamp) -> None:
        """Publish a measurement's messages, unless ROS is shutting down under the worker."""
        p = self.params
        if not self.context.ok():
            return
        if measurement.fix or p.publish_no_fix:
            self._fix_pub.publish(messages.navsat_fix(
                measurement, stamp, p.frame_id, p.altitude_fallback_m, p.altitude_sigma_m))
        if measurement.fix and self._geopose_pub is not None:
            self._geopose_pub.publish(messages.geopose(
                measurement, stamp, p.geopose_frame_id, self._geopose_type,
                p.altitude_fallback_m, p.altitude_sigma_m))
        imu = messages.heading_imu(measurement, stamp, p.frame_id) if self._imu_pub else None
        if imu is not None:
            self._imu_pub.publish(imu)

    # ------------------------------------------------------------------ diagnostics
    def _motion_track(self) -> str:
        """Return the motion prior's state: off (prior_radius_m 0), tracking or acquiring."""
        if self.params.prior_radius_m <= 0:
            return 'off'
        return 'tracking' if self.localizer.track.active else 'acquiring'

    def _publish_diagnostics(self) -> None:
        """Publish rates, latency, confidence and counters since the last report."""
        now = time.monotonic()
        with self._cond:
            c = dataclasses.replace(self._counters, latencies_s=self._counters.latencies_s)
            self._counters.latencies_s = []
        then, last = self._reported
        self._reported = (now, c)
        dt = max(now - then, 1e-6)
        problems = c.problems(last)
        level = DiagnosticStatus.WARN if problems else DiagnosticStatus.OK
        if c.errors > last.errors:
            level = DiagnosticStatus.ERROR
            problems.append(f'{c.errors - last.errors} failed localization(s)')
        lat = c.latencies_s
        model = self.localizer.model
        values = {
            'input_rate_hz': (c.received - last.received) / dt,
            'localization_rate_hz': (c.localized - last.localized) / dt,
            'latency_mean_ms': 1e3 * sum(lat) / len(lat) if lat else float('nan'),
            'latency_max_ms': 1e3 * max(lat) if lat else float('nan'),
            'confidence': c.confidence,
            'frames_received': c.received, 'frames_dropped': c.dropped,
            'bad_messages': c.bad, 'oversized_messages': c.oversized,
            'localization_errors': c.errors,
            'localizations': c.localized, 'fixes': c.fixes,
            'orientation_messages': c.orientations,
            'bad_orientation_messages': c.bad_orientations,
            'frames_with_heading_prior': c.with_prior,
            'frames_without_heading_prior': c.without_prior,
            'device': str(model.device), 'precision': model.precision,
            'fast_path': self._fast_path(),
            'motion_track': self._motion_track(),
            'database_places': len(self.localizer.database),
            'cameras': ' '.join(self._topics),
        }
        self._diag_pub.publish(messages.diagnostic_array(
            self.get_clock().now().to_msg(), f'{self.get_name()}: localization', str(model.device),
            level, '; '.join(problems) or 'localizing', values))


def main(args=None) -> int:
    """Run the node until SIGINT/SIGTERM; a start-up error gives one line and exit code 1."""
    logger = rclpy.logging.get_logger(NODE_NAME)
    try:
        rclpy.init(args=args)  # installs SIGINT and SIGTERM handlers that shut the context down
    except _rclpy.RCLError as exc:  # e.g. a --params-file that cannot be read
        logger.error(f'error: bad ROS arguments: {exc}')
        return 1
    try:
        node = CVGLNode(args)
    except TacoError as exc:
        logger.error(f'error: {exc}')
        rclpy.try_shutdown()
        return 1
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
