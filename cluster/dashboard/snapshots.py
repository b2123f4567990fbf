"""One snapshot of the index, shared by every request for `refresh_s`.

So a busy page or scraper costs Redis a few round trips per second at most,
however many clients poll.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cache_store import IndexUnavailable, MetadataIndex
from cluster.dashboard.collect import collect
from cluster.service.history import record_history

HISTORY_STALE_S = 15.0


class Snapshots:
    """Caches one snapshot for `refresh_s`; remembers the last good one for when Redis goes away."""

    def __init__(self, index: MetadataIndex, refresh_s: float):
        self.index = index
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._snap: dict[str, Any] | None = None
        self._error = ""
        self.last_good: dict[str, Any] | None = None

    def get(self) -> tuple[dict[str, Any] | None, str]:
        with self._lock:
            if time.monotonic() - self._at >= self.refresh_s:
                self._at = time.monotonic()
                try:
                    snap = collect(self.index)
                    self._fill_history(snap)
                    self._snap, self._error, self.last_good = snap, "", snap
                except IndexUnavailable as e:
                    self._snap, self._error = None, str(e)
            return self._snap, self._error

    def _fill_history(self, snap: dict[str, Any]) -> None:
        """If nobody (the router) has sampled lately, sample here so the chart keeps moving."""
        latest = snap["history_cumulative"][-1]["t"] if snap["history_cumulative"] else 0
        if snap["workers"] and time.time() - latest > HISTORY_STALE_S:
            record_history(self.index)
