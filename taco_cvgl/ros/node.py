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

With use_tf, each camera's mounting yaw and lever arm come from TF (tf_base_frame -> the image's
header.frame_id, an optical frame; ros/extrinsics.py gives the conventions) and each fix is
moved from the camera to tf_base_frame; camera_yaws_deg stays the fallback (logged once per
camera) until the transform is there. /diagnostics goes through diagnostic_updater where it is
installed (ros/diagnostics.py).

cvgl_lifecycle_node (taco_cvgl/ros/lifecycle_node.py) is the same node as a managed (lifecycle)
node; CVGLCore below is what both run, with the frames and worker in ros/frames.py and the
run-time changes in ros/runtime.py.

Run: ros2 run taco_cvgl cvgl_node --ros-args --params-file config/cvgl.yaml -p weights:=W
-p database:=D (or python -m taco_cvgl.ros.node ...). Parameters: taco_cvgl/ros/params.py.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Callable, List, Optional

from geometry_msgs.msg import QuaternionStamped
import rclpy
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import InvalidQosOverridesError, QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image, Imu, NavSatFix
from taco_cvgl.errors import InputError, TacoError
from taco_cvgl.localization.orientation import OrientationBuffer
from taco_cvgl.localization.settings import NodeParams
from taco_cvgl.ros import messages
from taco_cvgl.ros.diagnostics import Counters, Diagnostics
from taco_cvgl.ros.frames import FrameWork
from taco_cvgl.ros.params import check_topics, declare
from taco_cvgl.ros.runtime import MAP_NOTE, RuntimeChanges  # noqa: F401 - lifecycle_node's
from taco_cvgl.ros.slots import FrameSlots

NODE_NAME = 'cvgl_node'
# Orientation messages come at IMU rates, many per frame: a deeper queue than the images'.
ORIENTATION_QOS_DEPTH = 50
# Errors rclpy raises on a qos_overrides parameter it cannot apply (a bad policy name is a
# RuntimeError).
QOS_ERRORS = (InvalidParameterTypeException, InvalidQosOverridesError, RuntimeError)


class CVGLCore(FrameWork, RuntimeChanges, Diagnostics):
    """
    What cvgl_node and cvgl_lifecycle_node share: parameters, map, frames, worker, outputs.

    A mixin for an rclpy Node (plain or lifecycle), made of the frames and worker
    (ros/frames.py), the run-time changes (ros/runtime.py) and the diagnostics
    (ros/diagnostics.py). The steps, in the order a node runs them:
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
        self._slots = FrameSlots(0, self._cond)     # the newest frame of each camera
        self._pending: Optional[NodeParams] = None  # checked run-time changes, for the worker
        self._pending_map = None                    # a loaded map (localizer), for the worker
        self._reset_requested = False
        self._worker: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._inputs: list = []                     # the subscriptions
        self._diag_timer = self._updater = None     # diagnostics: see ros/diagnostics.py
        self._mounts = None                         # with use_tf: the cameras' mounts from TF
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
        self._slots.reset(len(self._topics))
        from taco_cvgl.localization.localizer import CVGLLocalizer  # torch: after checks
        self.localizer = CVGLLocalizer.from_settings(p, report_upgrade=self.get_logger().info)
        embedder = self.localizer.model   # the model, or a fast backend around it
        if self.localizer.upgrade is not None:
            self.get_logger().info(f'fast path: {embedder.backend} until int8 is compiled, in '
                                   f'the background (once per weights, map and thread count)')
        elif embedder.fallback_reason:
            self.get_logger().warning(f'fast path: fell back to {embedder.backend} '
                                      f'({embedder.fallback_reason})')

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
        self._diag_pub = self._diagnostics_publisher(create)

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
        """Subscribe to the cameras (orientation_topic, TF), start the diagnostics."""
        p = self.params
        msg_type = CompressedImage if p.image_transport == 'compressed' else Image
        for index, topic in enumerate(self._topics):
            self._inputs.append(self._overridable(
                self.create_subscription, msg_type, topic,
                lambda msg, i=index: self._store(i, msg), self._image_qos()))
        self._orientation_topic = self._subscribe_orientation(p)
        self._start_mounts()
        with self._cond:  # the first report covers the time since now
            self._reported = (time.monotonic(), dataclasses.replace(self._counters))
        self._start_diagnostics(p.diagnostics_period_s)

    def _stop_receiving(self) -> None:
        """Destroy the subscriptions, stop the diagnostics; forget the frames not yet taken."""
        for subscription in self._inputs:
            self.destroy_subscription(subscription)
        self._stop_mounts()
        self._stop_diagnostics()
        self._inputs, self._orientation_topic = [], ''
        self._slots.reset()

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
        """Start the worker thread that localizes the frames, then any int8 build waiting."""
        self._stop.clear()
        self._worker = threading.Thread(target=self._run, name='cvgl_worker', daemon=True)
        self._worker.start()
        upgrade = self.localizer.upgrade
        if upgrade is not None and upgrade.ident is None:   # not started: every check passed
            upgrade.start()

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
               f'({p.orientation_type})' if p.orientation_topic else '')
            + (f', camera mounts from TF ({p.tf_base_frame} -> each image frame)'
               if p.use_tf else ''))

    def _fast_path(self) -> str:
        """Return the inference backend in use: 'off' (eager model) or the fast path's name."""
        return self.localizer.model.backend

    def stop(self) -> None:
        """Stop the worker thread (the current batch finishes first); a no-op without one."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None


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
