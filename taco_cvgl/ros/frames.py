"""
cvgl_node's frames: the newest message of each camera in, localized in batches, messages out.

A mixin of CVGLCore (taco_cvgl/ros/node.py): the subscriptions' callbacks keep the newest frame
of each camera (and the orientation messages by stamp); the worker thread takes the frames,
localizes them as one batch and publishes. With use_tf the cameras' mounts (yaw and lever arm)
come from TF (taco_cvgl/ros/extrinsics.py) and each fix is moved to tf_base_frame.
"""

from __future__ import annotations

import time

from taco_cvgl.files.image_codec import decode_msg
from taco_cvgl.localization.orientation import message_prior
from taco_cvgl.ros import messages
from taco_cvgl.ros.extrinsics import CameraMounts, Mount, to_base

WARN_THROTTLE_S = 5.0  # at most one warning of a kind per this many seconds
# How long the worker waits for an orientation message stamped after the newest image (one in
# flight: a compass stamped a few ms after the camera often arrives just after the image).
ORIENTATION_WAIT_S = 0.25


class FrameWork:
    """The subscriber side and the worker side of CVGLCore (a mixin)."""

    # ------------------------------------------------------------------ subscriber side
    def _store(self, index: int, msg) -> None:
        """Keep the newest message of a camera; never blocks on the model."""
        with self._cond:
            self._counters.received += 1
            self._counters.dropped += int(self._slots.put(index, msg))

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
                self._cond.notify_all()   # a worker may wait for it (_heading_priors)
        if prior is None:
            self.get_logger().warning(f'{self._orientation_topic}: ignored an orientation '
                                      f'message: {reason}', throttle_duration_sec=WARN_THROTTLE_S)

    # ------------------------------------------------------------------ worker side
    def _run(self) -> None:
        """Take the newest frame of each camera, localize them as one batch, repeat."""
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._stop.is_set() or self._slots.waiting()
                                    or self._pending is not None or self._reset_requested, 0.5)
            self._apply_pending()
            frames = self._slots.take()
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
        mounts = self._camera_mounts(good)
        yaws = [mount.yaw_deg for mount in mounts]
        stamps = [m.header.stamp.sec + 1e-9 * m.header.stamp.nanosec for _, m, _ in good]
        matched = self._heading_priors([m.header.stamp for _, m, _ in good])
        results = self.localizer.localize_batch(
            images, stamps, yaws, headings=[prior for prior, _ in matched] or None)
        self._count_priors(matched, results)
        for (_, msg, received), measurement, mount in zip(good, results, mounts):
            measurement = to_base(measurement, mount.lever_xy)
            self._publish(measurement, msg.header.stamp)
            with self._cond:
                self._counters.localized += 1
                self._counters.fixes += int(measurement.fix)
                self._counters.confidence = measurement.confidence
                self._counters.latencies_s.append(time.monotonic() - received)

    def _camera_mounts(self, good) -> list:
        """Return the Mount of each (camera index, message, _): camera_yaws_deg, or TF's."""
        yaws, mounts = self.params.camera_yaws_deg, self._mounts  # (deactivate may clear it)
        if mounts is None:
            return [Mount(yaws[i]) for i, _, _ in good]
        return mounts.mounts([(i, m.header.frame_id) for i, m, _ in good], yaws)

    def _start_mounts(self) -> None:
        """With use_tf, listen to TF for the cameras' mounts (InputError without TF types)."""
        p = self.params
        if not p.use_tf:
            return
        self._mounts = CameraMounts(self, p.tf_base_frame, p.camera_model, self._topics)
        if p.frame_id != p.tf_base_frame:
            self.get_logger().warning(
                f'use_tf: the fixes give the position of {p.tf_base_frame} but are stamped '
                f'frame_id {p.frame_id}: set frame_id:={p.tf_base_frame}')

    def _stop_mounts(self) -> None:
        """Stop listening to TF."""
        if self._mounts is not None:
            self._mounts.close()
            self._mounts = None

    def _heading_priors(self, stamps) -> list:
        """
        Return (prior or None, reason) of each image stamp; [] without orientation_topic.

        Once orientation messages flow, a batch whose newest image is later than every message
        held waits up to ORIENTATION_WAIT_S (at most orientation_max_age_s) for one stamped at
        or after it, as an approximate-time synchroniser would: otherwise a compass stamped
        just after the camera always loses the race and its frames go without a prior.
        """
        if not self._orientation_topic:
            return []
        max_age_s = self.params.orientation_max_age_s
        latest = max(s.sec * 10**9 + s.nanosec for s in stamps)
        with self._cond:
            if self._orientation.newest_ns() is not None:
                self._cond.wait_for(lambda: self._stop.is_set()
                                    or self._orientation.newest_ns() >= latest,
                                    min(ORIENTATION_WAIT_S, max_age_s))
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
