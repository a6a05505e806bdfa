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
geometry_msgs/QuaternionStamped, see localization/orientation.py) is kept by stamp and each image
gets the heading prior nearest its own stamp (within orientation_max_age_s). A frame without one
(no message yet, none near its time, only messages without a usable heading) is localized without
a prior, never dropped; /diagnostics counts both kinds of frame and the refused messages.

Thresholds, verification and track settings change at run time (`ros2 param set`; the table in
localization/settings.py marks them): the callback checks a change and the worker applies it
between batches, as it does `~/reset_track` (std_srvs/Trigger), which forgets the motion track
(after the robot was carried elsewhere).

The map changes at run time too, without a restart, in two ways that share one loader:
- `ros2 param set /cvgl_node database /maps/other.npz`: the parameter callback loads that map
  beside the running one (same model: the map must have been built with these weights), and a
  map that does not load or does not match is refused with the reason as the set's result, so
  the parameter keeps naming the map in use;
- `~/load_map` (std_srvs/Trigger) reloads the file `database` names (a map rebuilt in place);
  the response says which map and how many places, or why not.
No ROS service type of the standard interfaces carries a path with a textual answer, hence the
parameter plus a Trigger. The worker swaps the new map in between batches, so every frame is
localized against one whole map; the motion track starts afresh (its places were the old
map's). The load runs in the call: the worker keeps localizing with the old map meanwhile,
new images wait (newest frame only). A fast_path:=int8 model stays calibrated on the first map.

Image subscriptions and every publisher take the standard QoS overrides
(`qos_overrides./TOPIC.subscription.reliability`, `.depth`, `.history`, publishers likewise, in
a params file), over the defaults qos_reliability and qos_depth give; a bad override is refused
at start with one line.

cvgl_lifecycle_node (taco_cvgl/ros/lifecycle_node.py) is the same node as a managed (lifecycle)
node; CVGLCore below is what both run.

Run: ros2 run taco_cvgl cvgl_node --ros-args --params-file config/cvgl.yaml -p weights:=W
-p database:=D (or python -m taco_cvgl.ros.node ...). Parameters: taco_cvgl/ros/params.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import sys
import threading
import time
from typing import Callable, Collection, List, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import QuaternionStamped
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import InvalidQosOverridesError, QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image, Imu, NavSatFix
from taco_cvgl.errors import InputError, MismatchError, TacoError
from taco_cvgl.files.image_codec import decode_msg, OversizedImageError
from taco_cvgl.localization.orientation import message_prior, OrientationBuffer
from taco_cvgl.localization.settings import localizer_config, NodeParams
from taco_cvgl.ros import messages
from taco_cvgl.ros.params import check_topics, declare, READ_ONLY, updated

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


# How the descriptor of `database` tells that a change loads a new map.
MAP_NOTE = ('changeable at run time: the node loads the new map (built with the same weights) '
            'and swaps it in between frames; a map that fails to load is refused, the old one '
            'stays')
TABLE = frozenset(field.name for field in dataclasses.fields(NodeParams))
# Errors rclpy raises on a qos_overrides parameter it cannot apply (a bad policy name is a
# RuntimeError).
QOS_ERRORS = (InvalidParameterTypeException, InvalidQosOverridesError, RuntimeError)


class CVGLCore:
    """
    What cvgl_node and cvgl_lifecycle_node share: parameters, map, frames, worker, outputs.

    A mixin for an rclpy Node (plain or lifecycle). The steps, in the order a node runs them:
    _init_core (parameters, services), _load (check topics, load weights and map),
    _open_outputs (publishers), _start_worker, _start_receiving (subscriptions, diagnostics);
    undone by _stop_receiving, stop, _close_outputs and _release.
    """

    def _init_core(self, argv: List[str], writable: Optional[dict] = None) -> None:
        """Declare the parameters (writable: see params.declare), offer the services."""
        self.params = declare(self, argv, writable)
        self.localizer = None
        self._geopose_type = messages.geopose_type()
        if self._geopose_type is None:
            self.get_logger().warning(
                'geographic_msgs is not installed: publishing NavSatFix only (install '
                'ros-$ROS_DISTRO-geographic-msgs for the GeoPose with heading)')
        self._cond = threading.Condition()
        self._topics: List[str] = []
        self._latest: List[Optional[tuple]] = []
        self._pending: Optional[NodeParams] = None  # checked run-time changes, for the worker
        self._pending_map = None                    # a loaded map (localizer), for the worker
        self._reset_requested = False
        self._worker: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._inputs: list = []                     # the subscriptions
        self._diag_timer = None
        self._outputs: list = []
        self._fix_pub = self._geopose_pub = self._imu_pub = self._diag_pub = None
        self._counters = Counters()
        self._reported = (time.monotonic(), Counters())
        self._orientation = OrientationBuffer()
        self._orientation_topic = ''
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._create_services()

    def _load(self) -> None:
        """Check the topic names, then load weights and map (TacoError naming the setting)."""
        p = self.params
        check_topics(self, p)
        compressed = p.image_transport == 'compressed'
        self._topics = [self.resolve_topic_name(t) + ('/compressed' if compressed else '')
                        for t in p.image_topics]
        self._latest = [None] * len(self._topics)
        from taco_cvgl.localization.localizer import CVGLLocalizer  # torch: after checks
        self.localizer = CVGLLocalizer.from_settings(p)
        fast = getattr(self.localizer.model, '_fast', None)
        if fast is not None and fast.fallback_reason:
            self.get_logger().warning(f'fast path: fell back to {fast.backend} '
                                      f'({fast.fallback_reason})')

    def _overridable(self, create: Callable, msg_type, topic: str, *args):
        """
        Return create(msg_type, topic, *args), a publisher or subscription, QoS overridable.

        The standard parameters qos_overrides./TOPIC.KIND.POLICY change its history, depth and
        reliability; one that rclpy cannot apply is an InputError naming the topic. rclpy
        writes the overrides into the QoSProfile given: give each entity its own.
        """
        try:
            return create(msg_type, topic, *args,
                          qos_overriding_options=QoSOverridingOptions.with_default_policies())
        except QOS_ERRORS as exc:
            if isinstance(exc, _rclpy.RCLError):  # rcl's own failure, not an override's
                raise
            raise InputError(f'topic {self.resolve_topic_name(topic)}: a qos_overrides '
                             f'parameter cannot be applied: {exc}') from None

    def _open_outputs(self, create_publisher: Callable) -> None:
        """Create the publishers with create_publisher (plain or lifecycle)."""
        p = self.params

        def create(msg_type, topic):
            publisher = self._overridable(create_publisher, msg_type, topic, 10)
            self._outputs.append(publisher)
            return publisher
        self._fix_pub = create(NavSatFix, p.fix_topic)
        self._geopose_pub = (create(self._geopose_type, p.geopose_topic)
                             if self._geopose_type else None)
        self._imu_pub = create(Imu, p.imu_topic) if p.imu_topic else None
        self._diag_pub = create(DiagnosticArray, '/diagnostics')

    def _close_outputs(self, destroy_publisher: Callable) -> None:
        """Destroy the publishers with destroy_publisher (plain or lifecycle)."""
        for publisher in self._outputs:
            destroy_publisher(publisher)
        self._outputs = []
        self._fix_pub = self._geopose_pub = self._imu_pub = self._diag_pub = None

    def _image_qos(self) -> QoSProfile:
        """Return the image subscriptions' QoS as qos_reliability and qos_depth give it."""
        p = self.params
        return QoSProfile(depth=p.qos_depth, history=HistoryPolicy.KEEP_LAST,
                          durability=DurabilityPolicy.VOLATILE,
                          reliability=ReliabilityPolicy.BEST_EFFORT
                          if p.qos_reliability == 'best_effort' else ReliabilityPolicy.RELIABLE)

    def _start_receiving(self) -> None:
        """Subscribe to the cameras (and orientation_topic), start the diagnostics timer."""
        p = self.params
        msg_type = CompressedImage if p.image_transport == 'compressed' else Image
        for index, topic in enumerate(self._topics):
            self._inputs.append(self._overridable(
                self.create_subscription, msg_type, topic,
                lambda msg, i=index: self._store(i, msg), self._image_qos()))
        self._orientation_topic = self._subscribe_orientation(p)
        with self._cond:  # the first report covers the time since now
            self._reported = (time.monotonic(), dataclasses.replace(self._counters))
        self._diag_timer = self.create_timer(p.diagnostics_period_s, self._publish_diagnostics)

    def _stop_receiving(self) -> None:
        """Destroy the subscriptions and the timer; forget the frames not yet taken."""
        for subscription in self._inputs:
            self.destroy_subscription(subscription)
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
        self._inputs, self._diag_timer, self._orientation_topic = [], None, ''
        with self._cond:
            self._latest = [None] * len(self._latest)

    def _subscribe_orientation(self, p: NodeParams) -> str:
        """Subscribe to orientation_topic (qos_reliability as the images); return it resolved."""
        if not p.orientation_topic:
            return ''
        topic = self.resolve_topic_name(p.orientation_topic)   # checked by check_topics
        qos = QoSProfile(depth=ORIENTATION_QOS_DEPTH, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.VOLATILE,
                         reliability=self._image_qos().reliability)
        msg_type = Imu if p.orientation_type == 'imu' else QuaternionStamped
        self._inputs.append(self._overridable(self.create_subscription, msg_type, topic,
                                              self._store_orientation, qos))
        return topic

    def _start_worker(self) -> None:
        """Start the worker thread that localizes the frames."""
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, name='cvgl_worker', daemon=True)
        self._worker.start()

    def _release(self) -> None:
        """Forget the localizer (model, map) and any map or change waiting for the worker."""
        with self._cond:
            self.localizer = self._pending_map = None
            if self._pending is not None:
                self.params, self._pending = self._pending, None

    def _ready_line(self, state: str = 'ready') -> str:
        """Return the log line of a node ready to localize: map, model, topics."""
        p, model = self.params, self.localizer.model
        return (
            f'{state}: {len(self.localizer.database)} places, model on {model.device} '
            f'({model.precision}, fast path {self._fast_path()}), cameras {self._topics}, '
            f'publishing {p.fix_topic}' + (f' and {p.geopose_topic}' if self._geopose_pub else '')
            + (f' and {p.imu_topic}' if self._imu_pub else '')
            + (f', heading prior from {self.resolve_topic_name(p.orientation_topic)} '
               f'({p.orientation_type})' if p.orientation_topic else ''))

    def _create_services(self) -> None:
        """Offer ~/reset_track and ~/load_map where std_srvs is installed; else warn."""
        try:
            from std_srvs.srv import Trigger
        except ImportError:
            self.get_logger().warning(
                'std_srvs is not installed: no ~/reset_track and ~/load_map services (install '
                'ros-$ROS_DISTRO-std-srvs)')
            return
        self.create_service(Trigger, '~/reset_track', self._on_reset_track)
        self.create_service(Trigger, '~/load_map', self._on_load_map)

    def _on_reset_track(self, request, response):
        """Ask the worker to forget the motion track before its next batch."""
        with self._cond:
            if self.localizer is None:
                response.success = False
                response.message = 'no map loaded: configure the node first'
                return response
            self._reset_requested = True
            self._cond.notify()
        response.success = True
        response.message = 'motion track reset: the next verified fix starts a new one'
        return response

    def _on_load_map(self, request, response):
        """Reload the map `database` names; the worker swaps it in before its next batch."""
        with self._cond:
            path = (self._pending or self.params).database
        try:
            if self.localizer is None:
                raise InputError('no map loaded: configure the node first (it loads database)')
            candidate = self._loaded_map(path)
        except InputError as exc:
            response.success, response.message = False, str(exc)
            return response
        self._offer_map(candidate)
        response.success = True
        response.message = (f'map {path} loaded ({len(candidate.database)} places): in use '
                            f'from the next frame')
        return response

    def _loaded_map(self, path: str):
        """
        Return a localizer over the map at path, sharing the running one's model and settings.

        Raises InputError with the reason when the file is missing, is no map, or does not
        match the weights; the running localizer is not touched.
        """
        current = self.localizer
        if not Path(path).is_file():
            raise InputError(f'parameter database: file not found: {path}')
        candidate = type(current)(current.model, current.config)
        try:
            candidate.load_map(path)
        except MismatchError as exc:
            raise InputError(f'parameter database: {path} does not match the weights '
                             f'{self.params.weights}: {exc}') from None
        except TacoError as exc:
            raise InputError(f'parameter database: {exc}') from None
        except Exception as exc:  # noqa: B902 - a map that breaks the loader must not end us
            raise InputError(f'parameter database: {path} cannot be loaded: '
                             f'{type(exc).__name__}: {exc}') from None
        return candidate

    def _offer_map(self, candidate) -> None:
        """Hand a loaded map to the worker, which swaps it in before its next batch."""
        with self._cond:
            self._pending_map = candidate
            self._cond.notify()

    def _writable(self) -> Collection[str]:
        """Return the settings read at start that a change may set now: the map."""
        return ('database',)

    def _read_only_reason(self) -> str:
        """Return why a start setting cannot change now."""
        return READ_ONLY

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """
        Check a run-time change against the table; the worker applies it between batches.

        A new database is loaded here, so that a map that fails is refused with its reason.
        Without a worker (an unconfigured lifecycle node) the values are kept for configure.
        """
        if not any(parameter.name in TABLE for parameter in parameters):
            return SetParametersResult(successful=True)  # rclpy's own: qos_overrides, sim time
        with self._cond:
            base = self._pending or self.params
        try:
            new = updated(base, parameters, self._writable(), self._read_only_reason())
            check_topics(self, new)
            new_map = (self._loaded_map(new.database) if self.localizer is not None
                       and any(p.name == 'database' for p in parameters) else None)
        except InputError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._cond:
            if self._worker is None:
                self.params = new
            else:
                self._pending = new
                self._pending_map = new_map or self._pending_map
            self._cond.notify()
        return SetParametersResult(successful=True)

    def _apply_pending(self) -> None:
        """
        Apply a new map, checked parameter changes and a track reset (worker, between batches).

        Under the lock, so that a change checked meanwhile builds on these values; a new map is
        warmed up first, outside it.
        """
        new_map = self._warmed_pending_map()
        with self._cond:
            swapped = new_map is not None and new_map is self._pending_map
            if swapped:
                new_map.reconfigure(self.localizer.config)  # changes applied meanwhile
                self.localizer, self._pending_map = new_map, None
            params, self._pending = self._pending, None
            reset, self._reset_requested = self._reset_requested, False
            if params is not None:
                self.localizer.reconfigure(localizer_config(params))
                changed = [f'{name}={value}' for name, value in dataclasses.asdict(params).items()
                           if value != getattr(self.params, name)]
                self.params = params
            if reset:
                self.localizer.track.reset()
        if swapped:
            self.get_logger().info(f'map swapped: {len(new_map.database)} places from '
                                   f'{self.params.database}')
        if params is not None:
            self.get_logger().info(f'parameters changed: {", ".join(changed) or "none"}')
        if reset:
            self.get_logger().info('motion track reset')

    def _warmed_pending_map(self):
        """Return the map waiting to be swapped in, warmed up (None: none, or it failed)."""
        with self._cond:
            new_map = self._pending_map
        if new_map is None:
            return None
        try:
            new_map.warm_up()   # here: the model is used by one thread only
        except Exception as exc:  # noqa: B902 - the old map stays, the node goes on
            with self._cond:
                if self._pending_map is new_map:
                    self._pending_map = None
            self.get_logger().error(f'map not swapped: its warm-up failed: '
                                    f'{type(exc).__name__}: {exc}')
            return None
        return new_map

    def _fast_path(self) -> str:
        """Return the inference backend in use: 'off' (eager model) or the fast path's name."""
        fast = getattr(self.localizer.model, '_fast', None)
        return 'off' if fast is None else fast.backend

    def stop(self) -> None:
        """Stop the worker thread (the current batch finishes first); a no-op without one."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None

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
            'database': self.params.database,
            'cameras': ' '.join(self._topics),
        }
        self._diag_pub.publish(messages.diagnostic_array(
            self.get_clock().now().to_msg(), f'{self.get_name()}: localization', str(model.device),
            level, '; '.join(problems) or 'localizing', values))


class CVGLNode(CVGLCore, Node):
    """Subscribe to the cameras, localize their newest frames in batches, publish fixes."""

    def __init__(self, argv: Optional[List[str]] = None, **kwargs):
        """
        Declare parameters, load model and database (fail fast), start the worker.

        argv: the command line given to rclpy.init (None: sys.argv, as there), so that a value
        rcl could not apply is refused rather than ignored.
        """
        super().__init__(NODE_NAME, **kwargs)
        try:
            self._start(command_line(argv, kwargs))
        except BaseException:
            # A half-built node left to the garbage collector is freed after rclpy's shutdown,
            # which can crash the process (SIGSEGV) instead of the clean exit code 1.
            self.destroy_node()
            raise

    def _start(self, argv: List[str]) -> None:
        """Check and declare the parameters, load model and map, open the topics, start work."""
        self._init_core(argv, {'database': MAP_NOTE})
        self._load()
        self._open_outputs(self.create_publisher)
        self._start_receiving()
        self._start_worker()
        self.get_logger().info(self._ready_line())


def command_line(argv: Optional[List[str]], node_kwargs: dict) -> List[str]:
    """Return the arguments a node's values come from: rclpy.init's (sys.argv) and cli_args."""
    return [*(sys.argv if argv is None else argv), *(node_kwargs.get('cli_args') or ())]


def run(make_node: Callable, name: str, args=None) -> int:
    """Run a node until SIGINT/SIGTERM; a start-up error gives one line and exit code 1."""
    logger = rclpy.logging.get_logger(name)
    try:
        rclpy.init(args=args)  # installs SIGINT and SIGTERM handlers that shut the context down
    except _rclpy.RCLError as exc:  # e.g. a --params-file that cannot be read
        logger.error(f'error: bad ROS arguments: {exc}')
        return 1
    try:
        node = make_node(args)
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
    except _rclpy.RCLError:
        # A signal that shuts the context down while a callback runs makes the executor's next
        # wait set fail (rclpy checks the context only after a wait): that is a clean end too.
        if rclpy.ok():
            raise
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(args=None) -> int:
    """Run cvgl_node (see run)."""
    return run(CVGLNode, NODE_NAME, args)


if __name__ == '__main__':
    sys.exit(main())
