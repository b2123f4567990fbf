"""Monotonic counters flushed to the index as deltas.

Totals live here; the index only ever receives `HINCRBY delta`, and a delta
is marked flushed only after Redis accepted it. So an outage loses nothing
and a retry never double-counts.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total: Counter[str] = Counter()
        self._flushed: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._total[name] += int(n)

    def add_many(self, values: Mapping[str, int]) -> None:
        with self._lock:
            for name, n in values.items():
                if n:
                    self._total[name] += int(n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._total)

    def get(self, name: str) -> int:
        with self._lock:
            return self._total[name]

    def pending(self) -> dict[str, int]:
        """Increments not yet acknowledged by the index."""
        with self._lock:
            return {k: v - self._flushed[k] for k, v in self._total.items() if v != self._flushed[k]}

    def mark_flushed(self, deltas: Mapping[str, int]) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._flushed[k] += v
