"""
cvgl_node's /diagnostics: one status, `<node name>: localization`, with the counters as values.

Published through diagnostic_updater (its Updater and timer) where it is installed, as on a
robot, and by the node's own timer and publisher where it is not; the status name, level,
message, hardware id (the model's device) and keys are the same either way.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from taco_cvgl.files.image_codec import OversizedImageError
from taco_cvgl.ros import messages

# The task's name: the status is named `<node name>: localization` either way.
TASK = 'localization'


def updater_type() -> Optional[type]:
    """Return diagnostic_updater's Updater, or None where it is not installed."""
    try:
        from diagnostic_updater import Updater
    except ImportError:
        return None
    return Updater


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


class Diagnostics:
    """
    The diagnostics of CVGLCore (a mixin).

    With diagnostic_updater, one Updater per node (it declares its parameters on the node),
    made at the first start; its timer is destroyed at each stop and made again at each start,
    with diagnostics_period_s. Without it, the node's own publisher (created with the outputs,
    QoS overridable) and timer.
    """

    def _diagnostics_publisher(self, create: Callable):
        """Return the /diagnostics publisher made by create; None where the Updater publishes."""
        return create(DiagnosticArray, '/diagnostics') if updater_type() is None else None

    def _start_diagnostics(self, period_s: float) -> None:
        """Start publishing every period_s seconds."""
        kind = updater_type()
        if kind is None:
            self._diag_timer = self.create_timer(period_s, self._publish_diagnostics)
        elif self._updater is None:
            self._updater = kind(self, period_s)   # publishes on its own timer from now on
            self._updater.add(TASK, self._fill_diagnostics)
        else:
            self._updater.timer = self.create_timer(period_s, self._updater.update)

    def _stop_diagnostics(self) -> None:
        """Stop publishing (a no-op when not started)."""
        timer = self._updater.timer if self._updater is not None else self._diag_timer
        if timer is not None:
            self.destroy_timer(timer)
        if self._updater is not None:
            self._updater.timer = None
        self._diag_timer = None

    def _motion_track(self) -> str:
        """Return the motion prior's state: off (prior_radius_m 0), tracking or acquiring."""
        if self.params.prior_radius_m <= 0:
            return 'off'
        return 'tracking' if self.localizer.track.active else 'acquiring'

    def _publish_diagnostics(self) -> None:
        """Publish the status (the node's own timer, without diagnostic_updater)."""
        self._diag_pub.publish(self._diagnostics())

    def _fill_diagnostics(self, stat):
        """Fill diagnostic_updater's DiagnosticStatusWrapper with the status; return it."""
        status = self._diagnostics().status[0]
        stat.summary(status.level, status.message)
        stat.hardware_id = status.hardware_id
        stat.values = status.values
        return stat

    def _diagnostics(self) -> DiagnosticArray:
        """Return rates, latency, confidence and counters since the last report."""
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
        return messages.diagnostic_array(   # (the Updater names its status itself, the same)
            self.get_clock().now().to_msg(), f'{self.get_name()}: {TASK}', str(model.device),
            level, '; '.join(problems) or 'localizing', values)
