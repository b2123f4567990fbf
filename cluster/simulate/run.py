"""The event loop: replay a trace through the real `Router` onto simulated workers on a simulated clock.

Events, in time order (at equal times, work that frees capacity runs before new arrivals):
    arrive   the router places the request (real `Router.place`, one `holders` call on the index)
    start    the worker's queue reaches it: pin the cached prefix, fetch from the peer the router named
             when the engine's cost rule says it pays, and count `cached_tokens` as the engine does
    prefill  the computed blocks are inserted (real eviction) and published to the index
    finish   the request leaves the worker; the router's load accounting hears of it
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Sequence

from cache_store import CacheConfig
from cluster.routing.policies import make_policy
from cluster.routing.router import Plan, Router
from cluster.simulate.index import SimIndex
from cluster.simulate.metrics import (
    LOST_ELSEWHERE,
    LOST_EVICTED,
    LOST_IN_FLIGHT,
    Outcome,
    PolicyResult,
    summarize,
)
from cluster.simulate.timing import TimeModel
from cluster.simulate.trace import TRACE_BLOCK_TOKENS, TRACE_NAMESPACE, TraceRequest, block_tokens, chain_of
from cluster.simulate.worker import SimWorker

FINISH, PREFILL, START, ARRIVE = range(4)  # tie order at equal times
AFFINITIES = ("prefix", "round_robin")  # how arrivals are dealt to router replicas
REFRESH_S = CacheConfig().heartbeat_s  # a worker refreshes holder counts with each heartbeat


class Prepared:
    """A trace request with its hash chain and block tokens, computed once for every policy run."""

    __slots__ = ("index", "req", "chain", "tokens")

    def __init__(self, index: int, req: TraceRequest):
        self.index = index
        self.req = req
        self.chain = chain_of(req)
        self.tokens = block_tokens(req)


def prepare(trace: Sequence[TraceRequest]) -> list[Prepared]:
    return [Prepared(i, r) for i, r in enumerate(trace)]


def make_router(policy: str, workers: list[str], index: SimIndex, time: TimeModel) -> Router:
    router = Router(
        tokenizer=None,
        fingerprint=TRACE_NAMESPACE,
        block_size=TRACE_BLOCK_TOKENS,
        max_context=1 << 40,
        vocab_size=1 << 40,
        index=index,
        policy=make_policy(policy),
        workers=workers,
    )
    for w in workers:
        router.set_costs(w, time)
    return router


def replica_for(chain: Sequence[bytes], arrival: int, replicas: int, affinity: str) -> int:
    """Which router replica places a request. "prefix": by the hash of its first block, so every
    request of one prefix meets the same replica, whose own in-flight accounting then covers that
    prefix's holders (measured: it keeps TTFT p99 near one router's, dealing in turn does not).
    The service deals the same way (`cluster.service.replica_for`, on the first block's tokens; a
    trace has only the block's hash). "round_robin": in turn, what a plain load balancer does."""
    if affinity == "prefix" and chain:
        return int.from_bytes(chain[0][:8], "little") % replicas
    return arrival % replicas


def use_clock(router: Router, clock) -> None:
    """The router times in-flight work with `clock`; in a simulation that is the simulated clock."""
    router.clock = clock


def report_finished(router: Router, plan: Plan, busy_s: float) -> None:
    """The router's load accounting, in the one place the simulator touches it (its API may change)."""
    router.finished(plan, busy_s)


class Simulation:
    def __init__(
        self,
        workers: int,
        capacity_blocks: int,
        policy: str,
        time: TimeModel,
        eviction: str = CacheConfig.eviction,
        duplicates_first: bool = True,
        routers: int = 1,
        affinity: str = "prefix",
        bound_blocks: Sequence[int] | None = None,
    ):
        if affinity not in AFFINITIES:
            raise ValueError(f"unknown router affinity {affinity!r}; choose one of {AFFINITIES}")
        self.affinity = affinity
        self.index = SimIndex()
        self.time = time
        ids = [f"w{i:03d}" for i in range(workers)]
        self.workers = {
            w: SimWorker(w, capacity_blocks, eviction, self.index, duplicates_first=duplicates_first) for w in ids
        }
        # Several stateless replicas share the index; each knows only the load and predictions of
        # the requests it placed itself. Arrivals are dealt by `replica_for`.
        self.routers = [make_router(policy, ids, self.index, time) for _ in range(routers)]
        self.now = 0.0
        for router in self.routers:
            use_clock(router, lambda: self.now)
        self._arrivals = 0
        self.queues: dict[str, deque] = {w: deque() for w in ids}
        self.busy_until: dict[str, float | None] = dict.fromkeys(ids)
        self.busy_s: dict[str, float] = dict.fromkeys(ids, 0.0)
        self.outcomes: list[Outcome] = []
        self.duplicate_samples: list[int] = []
        # Loss accounting against the one-shared-cache run: its cached blocks per request index
        self.bound_blocks = bound_blocks
        self.lost: Counter[str] = Counter()
        self.off_holder = self.off_holder_blocks = 0
        self._events: list = []
        self._seq = itertools.count()

    def _push(self, t: float, kind: int, *payload) -> None:
        heapq.heappush(self._events, (t, kind, next(self._seq), payload))

    def run(self, requests: Sequence[Prepared]) -> list[Outcome]:
        for p in requests:
            self._push(p.req.arrival_s, ARRIVE, p)
        while self._events:
            t, kind, _, payload = heapq.heappop(self._events)
            self.now = t
            (self._finish, self._prefill_done, self._start, self._arrive)[kind](t, *payload)
        return self.outcomes

    def _arrive(self, t: float, p: Prepared) -> None:
        router = self.routers[replica_for(p.chain, self._arrivals, len(self.routers), self.affinity)]
        self._arrivals += 1
        plan = router.place(range(p.req.input_tokens), p.chain)
        pl = plan.placement
        if pl.peer is None and pl.local_blocks < pl.best_blocks:
            self.off_holder += 1
            self.off_holder_blocks += pl.best_blocks - pl.local_blocks
        w = pl.worker_id
        self.queues[w].append((p, plan, t, router))
        if self.busy_until[w] is None:
            self._start_next(t, w)
        self.duplicate_samples.append(self.index.stored - self.index.distinct)

    def _start_next(self, t: float, w: str) -> None:
        if self.queues[w]:
            self.busy_until[w] = t
            self._push(t, START, w, *self.queues[w].popleft())
        else:
            self.busy_until[w] = None

    def _start(self, t: float, w: str, p: Prepared, plan: Plan, arrived: float, router: Router) -> None:
        self.workers[w].refresh_copies(t, REFRESH_S)
        best = self.index.longest_run(p.chain) if self.bound_blocks is not None else 0
        peer, peer_blocks = None, 0
        if plan.placement.peer is not None:
            holder, n = plan.placement.peer
            local = self.workers[w].store.lookup(p.chain, p.tokens)
            if self.time.fetch_pays(n - local, TRACE_BLOCK_TOKENS):
                peer, peer_blocks = self.workers[holder], n
        s = self.workers[w].start(p.chain, p.tokens, peer, peer_blocks)
        cached = min(len(s.hold) * TRACE_BLOCK_TOKENS, p.req.input_tokens - 1)
        fetch = self.time.fetch_s(s.fetched_blocks)
        prefill = self.time.prefill_s(p.req.input_tokens - cached)
        ttft = t - arrived + fetch + prefill + self.time.decode_s_per_token
        self._push(t + fetch + prefill, PREFILL, w, p, plan, s)
        busy = fetch + prefill + p.req.output_tokens * self.time.decode_s_per_token
        self._push(t + busy, FINISH, w, plan, busy, router)
        self.outcomes.append(Outcome(p.index, w, p.req.input_tokens, cached, s.local_blocks, s.fetched_blocks, ttft))
        router.account(plan, cached)
        if self.bound_blocks is not None:
            self._count_lost(p, len(s.hold), best)

    def _count_lost(self, p: Prepared, got: int, best: int) -> None:
        """Why blocks the one shared cache served this request are not served here (see LOSSES);
        `best`: the most leading blocks any worker held as the request started."""
        for i in range(got, self.bound_blocks[p.index]):
            if i < best:
                reason = LOST_ELSEWHERE
            elif p.chain[i] in self.index.ever:
                reason = LOST_EVICTED
            else:
                reason = LOST_IN_FLIGHT
            self.lost[reason] += TRACE_BLOCK_TOKENS

    def _prefill_done(self, t: float, w: str, p: Prepared, plan: Plan, s) -> None:
        self.workers[w].finish_prefill(s, p.chain, p.tokens)

    def _finish(self, t: float, w: str, plan: Plan, busy: float, router: Router) -> None:
        self.busy_s[w] += busy
        report_finished(router, plan, busy)
        self._start_next(t, w)


def simulate_policy(
    requests: Sequence[Prepared],
    workers: int,
    capacity_blocks: int,
    policy: str,
    time: TimeModel,
    eviction: str = CacheConfig.eviction,
    duplicates_first: bool = True,
    routers: int = 1,
    affinity: str = "prefix",
    bound_blocks: Sequence[int] | None = None,
) -> PolicyResult:
    return summarize(
        policy,
        run_policy(
            requests,
            workers,
            capacity_blocks,
            policy,
            time,
            eviction,
            duplicates_first,
            routers,
            affinity,
            bound_blocks,
        ),
    )


def run_policy(
    requests: Sequence[Prepared],
    workers: int,
    capacity_blocks: int,
    policy: str,
    time: TimeModel,
    eviction: str = CacheConfig.eviction,
    duplicates_first: bool = True,
    routers: int = 1,
    affinity: str = "prefix",
    bound_blocks: Sequence[int] | None = None,
) -> Simulation:
    """The finished simulation of one policy (`summarize` reads it)."""
    sim = Simulation(
        workers, capacity_blocks, policy, time, eviction, duplicates_first, routers, affinity, bound_blocks
    )
    sim.run(requests)
    return sim


def cached_blocks(sim: Simulation, requests: int) -> list[int]:
    """Blocks each request (by trace index) was served from cache in `sim`."""
    out = [0] * requests
    for o in sim.outcomes:
        out[o.index] = o.local_blocks + o.fetched_blocks
    return out
