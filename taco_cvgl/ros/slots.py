"""
The node's frame slots: the newest frame of each camera, waiting for the worker.

One slot per camera, a queue of depth one: a frame that arrives while its camera's previous one
still waits replaces it (that one is dropped), so the node never builds a backlog when the model
is slower than the cameras, and the worker always localizes the newest frames together, as one
batch. Plain Python (no rclpy): benchmarks/bench_multi_camera.py drives the same class.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List, Optional, Tuple


class FrameSlots:
    """The newest frame of each camera, with the monotonic time it arrived."""

    def __init__(self, cameras: int = 0, cond: Optional[threading.Condition] = None):
        """Make `cameras` empty slots guarded by `cond` (a new condition if None)."""
        self.cond = cond if cond is not None else threading.Condition()
        self._latest: List[Optional[Tuple[Any, float]]] = [None] * cameras

    def put(self, camera: int, frame: Any) -> bool:
        """Keep `frame` as the camera's newest and wake the worker; True: one was dropped."""
        with self.cond:
            dropped = self._latest[camera] is not None
            self._latest[camera] = (frame, time.monotonic())
            self.cond.notify()
        return dropped

    def waiting(self) -> bool:
        """Return True when a frame of some camera waits; call it holding `cond`."""
        return any(slot is not None for slot in self._latest)

    def take(self) -> List[Tuple[int, Tuple[Any, float]]]:
        """Return and empty every waiting (camera, (frame, arrival time)), in camera order."""
        with self.cond:
            frames = [(i, slot) for i, slot in enumerate(self._latest) if slot is not None]
            self._latest = [None] * len(self._latest)
        return frames

    def reset(self, cameras: Optional[int] = None) -> None:
        """Drop every waiting frame; with `cameras`, resize to that many slots."""
        with self.cond:
            self._latest = [None] * (len(self._latest) if cameras is None else cameras)
