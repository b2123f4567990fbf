"""Cache churn per worker: how fast the router is filling each worker's cache, priced per block.

One shared cache evicts the cluster's least recently used block; per-worker caches each evict their
own. When placement sends one worker more new blocks than the others (every session under a popular
system prompt goes to that prompt's holder, which is always the cheapest place to start one), that
worker's cache turns over faster than the cluster's would, and the blocks it evicts are younger:
live conversations' earlier turns, while other caches sit half empty. That is where conversation
traffic lost hit rate at 64-256 workers (issue 23). So a placement pays, per block it makes a worker
write (computed, or fetched from a peer: a copy takes room too), the block's recompute times the
chance that the block it pushes out is still live, taken as

    1 - (the cluster's mean write rate / this worker's)      (0 for a worker at or below the mean)

With equal caches, a worker written no faster than the mean keeps its blocks as long as one
shared cache of the cluster would; one written k times faster keeps them 1/k as long. Rates are
blocks written, decayed with a time constant (`tau_s`); only their ratios are read, so they are
kept scaled by exp((t - t0) / tau) and adding is one multiply, not a decay of every worker.

`CacheChurn` is a read-only Mapping worker -> seconds per block written, holding only the workers
above the mean (so `get(w, 0.0)` is the price): the policy reads it under the router's lock.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Mapping


class CacheChurn(Mapping):
    def __init__(self, block_s: Callable[[str], float], tau_s: float):
        self._block_s = block_s  # seconds to recompute one block on a worker
        self.tau_s = tau_s
        self._written: dict[str, float] = {}  # scaled decayed blocks written per worker
        self._total = 0.0
        self._t0: float | None = None
        self._live = 1  # workers the mean is taken over
        self._above: set[str] = set()  # workers written faster than the mean: the priced ones
        self._heap: list[tuple[float, str]] = []  # (written, worker) of _above, lazily pruned

    # ---- what the router tells it ---------------------------------------------------

    def note(self, worker: str, blocks: int, now: float) -> None:
        """`worker` was sent `blocks` more blocks to cache at clock time `now`."""
        if self._t0 is None or now - self._t0 > 50 * self.tau_s:  # keep the scale finite
            k = math.exp((self._t0 - now) / self.tau_s) if self._t0 is not None else 1.0
            self._written = {w: n * k for w, n in self._written.items()}
            self._total *= k
            self._t0 = now
            self._rebuild()
        if blocks <= 0:
            return
        add = blocks * math.exp((now - self._t0) / self.tau_s)
        mine = self._written[worker] = self._written.get(worker, 0.0) + add
        self._total += add
        if mine > self._mean():
            self._above.add(worker)
            heapq.heappush(self._heap, (mine, worker))
        self._prune()

    def set_live(self, live: int) -> None:
        """The number of live workers changed: the mean moves either way, so re-sort."""
        if live != self._live:
            self._live = max(1, live)
            self._rebuild()

    def forget(self, worker: str) -> None:
        """A dead worker's cache is gone: its writes no longer weigh on the mean."""
        self._total -= self._written.pop(worker, 0.0)
        self._rebuild()

    # ---- the Mapping the policy reads -------------------------------------------------

    def __getitem__(self, worker: str) -> float:
        if worker not in self._above:
            raise KeyError(worker)
        return self._block_s(worker) * (1.0 - self._mean() / self._written[worker])

    def __iter__(self) -> Iterator[str]:
        return iter(self._above)

    def __len__(self) -> int:
        return len(self._above)

    def __contains__(self, worker: object) -> bool:
        return worker in self._above

    # ---- upkeep -------------------------------------------------------------------------

    def _mean(self) -> float:
        return self._total / self._live

    def _prune(self) -> None:
        """The mean only rises between rebuilds: drop the workers it passed (the heap's smallest)."""
        mean = self._mean()
        while self._heap and self._heap[0][0] <= mean:
            value, w = heapq.heappop(self._heap)
            if self._written.get(w) == value:  # else a stale entry: w's newer one is still queued
                self._above.discard(w)
        if len(self._heap) > 4 * len(self._above) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        mean = self._mean()
        self._above = {w for w, n in self._written.items() if n > mean}
        self._heap = [(self._written[w], w) for w in self._above]
        heapq.heapify(self._heap)
