"""LeaseKeeper: keeps one worker's lease alive and its index entries true.

One daemon thread; every `heartbeat_s` it
  1. registers (first beat, or after being unreachable at start),
  2. renews the lease with load gauges and flushes counter deltas (one round trip),
  3. re-publishes the whole store if the lease had lapsed or a publish failed
     (Redis restarted empty, or was down past the TTL),
  4. every few beats, purges the entries of workers whose lease expired,
  5. refreshes the store's view of how many workers hold each block it may
     evict next (one pipelined read), for duplicates-first eviction.
It never raises on an outage: it records `connected = False` and tries again
on the next beat, while the store serves from its local tiers.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping

from cache_store.counters import Counters
from cache_store.errors import Fenced, IndexUnavailable
from cache_store.index import MetadataIndex
from cache_store.tiered import TieredStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        index: MetadataIndex,
        store: TieredStore,
        worker_id: str,
        *,
        info: Mapping[str, object] | None = None,
        gauges: Callable[[], Mapping[str, object]] | None = None,
        counters: Counters | None = None,
        reap_every: int = 5,
    ):
        self.index, self.store, self.worker_id = index, store, worker_id
        # flushed with every beat: the store's own, and the owner's (an engine's request counters)
        self._counters = (store.counters, *([counters] if counters is not None else []))
        self._info = dict(info or {})
        self.gauges = gauges or (lambda: {})
        self._reap_every = reap_every
        self.generation: int | None = None
        self.connected = False
        self.fenced = False
        self.last_error = ""
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.bind_index(index, worker_id)

    def start(self) -> LeaseKeeper:
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.worker_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.index.config.heartbeat_s):
            self.beat()

    def _fields(self) -> dict[str, object]:
        return {**self._info, **self.gauges()}

    def beat(self) -> None:
        """One heartbeat cycle (also called directly by tests)."""
        if self.fenced:
            return
        try:
            if self.generation is None:
                self.generation = self.index.register(self.worker_id, self._fields())
                self.store.set_generation(self.generation)
            deltas = [c.pending() for c in self._counters]
            total: Counter[str] = Counter()
            for d in deltas:
                total.update(d)
            reply = self.index.heartbeat(self.worker_id, self.generation, self._fields(), total)
            for c, d in zip(self._counters, deltas):
                c.mark_flushed(d)
            if reply.lease_was_missing:
                self.store.mark_dirty()
            if self.store.needs_resync:
                self.store.resync()
            self._beats += 1
            if self._beats % self._reap_every == 0:
                self.index.reap_dead()
            self.store.refresh_copies()
            self.connected, self.last_error = True, ""
        except Fenced as e:
            log.error("%s; this instance stops publishing", e)
            self.fenced, self.connected, self.last_error = True, False, str(e)
            self._stop.set()
        except IndexUnavailable as e:
            if self.connected:
                log.warning("index unreachable, serving from local cache: %s", e)
            self.connected, self.last_error = False, str(e)

    def stop(self, *, deregister: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if deregister and self.generation is not None and not self.fenced:
            try:
                self.index.deregister(self.worker_id, self.generation)
            except IndexUnavailable as e:
                log.warning("could not deregister %s: %s (its lease will expire)", self.worker_id, e)
