"""Spin an rclpy executor in a background thread that stops when asked, before shutdown."""

from __future__ import annotations

import threading

from rclpy.executors import Executor


class BackgroundSpinner:
    """
    Spin `executor` in a daemon thread, one bounded `spin_once` at a time, until `stop()`.

    Shutting an executor down while another thread is inside `Executor.spin()` races with its
    wait set: the spinning thread can end up looping without ever leaving, holding the GIL
    and starving the rest of the process. Here the thread checks a stop flag between waits of at
    most `period_s`, so `stop()` returns once the thread has really ended, and only then may the
    executor and its nodes be shut down and destroyed. Use it as a context manager.
    """

    def __init__(self, executor: Executor, period_s: float = 0.1):
        """Prepare (not start) the spinning thread."""
        self.executor = executor
        self.period_s = float(period_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='spinner', daemon=True)

    def start(self) -> 'BackgroundSpinner':
        """Start spinning; return self."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Ask the thread to stop and wait for it; return True when it has ended."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set() and self.executor.context.ok():
            try:
                self.executor.spin_once(timeout_sec=self.period_s)
            except Exception:  # noqa: B902 - the context or executor went away: stop spinning
                return

    def __enter__(self) -> 'BackgroundSpinner':
        """Start spinning."""
        return self.start()

    def __exit__(self, *exc) -> None:
        """Stop spinning (before the caller shuts the executor down)."""
        self.stop()
