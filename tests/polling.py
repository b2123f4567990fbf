"""Waiting on what the system does in the background (heartbeats, metric exports, restarts, audits):
a fixed sleep is either flaky or slow, so tests poll."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], what: str, timeout: float = 30.0, every: float = 0.2) -> T:
    """Call `cond` every `every` seconds until it returns something truthy, and return that.

    Raises AssertionError naming `what` (what the test waited for) if `timeout` seconds pass first;
    `cond` is always called at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        last_try = time.monotonic() >= deadline
        value = cond()
        if value:
            return value
        if last_try:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))
