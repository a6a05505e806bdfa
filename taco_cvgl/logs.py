"""Logging helpers shared by the stages (no rclpy: the node's own logger is rclpy's)."""

import contextlib
import logging
from typing import Iterator, Sequence


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers to `level` meanwhile (libraries' notes), then restore them."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)
