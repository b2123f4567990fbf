"""Placement policies: given who holds how much of a prompt, and who is busy, pick a worker.

A policy is a pure function of a `PlacementInput`, so it is tested without
Ray or Redis and benchmarks can swap policies by name:

    cache_aware    minimise estimated time to first token: uncached prefill
                   + promotion of host-tier blocks + reading disk-tier blocks
                   (when that beats recomputing them) + peer fetch (when the
                   cost model says fetching beats recomputing) + the work
                   queued ahead on that worker, + recomputing what another
                   worker already holds counted once more (cluster time lost).
                   A hot prefix therefore spreads once its holder's queue
                   costs more than a peer fetch (or a duplicate prefill).
    round_robin    ignore the cache (what a plain load balancer does).
    least_loaded   fewest in-flight requests, ignore the cache.

When the index is unreachable `cache_aware` falls back to rendezvous hashing
on the prompt's first block (a prefix keeps landing on the same worker, so
local caches still hit) with a load cap.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from cache_store import BlockHash, Holding
from worker.costs import DEFAULT_COSTS, CostModel


@dataclass(frozen=True)
class PlacementInput:
    """What a policy decides on. The mappings may be live read-only views of the caller's state (the
    router's, read under its lock, not copied per placement): read them in `place`, keep none."""

    prompt_tokens: int
    block_size: int
    chain: Sequence[BlockHash]
    workers: Sequence[str]  # live candidates, in a stable order
    inflight: Mapping[str, int]
    holdings: Sequence[Holding] | None  # what the index says (fetchable); None: index unavailable
    costs: Mapping[str, CostModel] = field(default_factory=dict)
    service_s: float = 0.05  # recent mean time a request occupies a worker
    prefixes: Mapping[str, int] = field(default_factory=dict)  # distinct prompt prefixes recently placed per worker
    turn: int = 0  # rotates tie-breaks between equal workers
    # Leading blocks each worker will hold once the requests already placed there ran: a burst for a
    # new prefix queues behind the request computing it instead of computing it again elsewhere.
    predicted: Mapping[str, int] = field(default_factory=dict)
    # Seconds of work queued ahead of a new request on each worker (see Router.load_s); when absent,
    # in-flight requests x service_s.
    load_s: Mapping[str, float] | None = None
    # Positions in `workers` of each cost profile's workers (ascending), when the caller keeps them
    # at hand (the router does); None: the policy splits `workers` itself.
    profiles: Sequence[Sequence[int]] | None = None
    # Seconds of later recompute each block written on a worker is expected to cost, by pushing out a
    # block that is still live (Router.churn_s: workers whose cache turns over faster than the
    # cluster's); absent: 0. A placement writes every chain block its worker does not hold, fetched
    # copies included, so this prices both a turn moved away from its session and a peer copy.
    churn_s: Mapping[str, float] | None = None

    def queue_s(self, worker: str) -> float:
        if self.load_s is not None:
            return self.load_s.get(worker, 0.0)
        return self.inflight.get(worker, 0) * self.service_s

    def extra_s(self, worker: str, written: int) -> float:
        """What a placement on `worker` writing `written` blocks adds to its cost estimate: the work
        queued ahead of it, and the live blocks its writes are expected to evict."""
        if not self.churn_s or not written:
            return self.queue_s(worker)
        return self.queue_s(worker) + self.churn_s.get(worker, 0.0) * written


class Placement(NamedTuple):
    worker_id: str
    local_blocks: int  # blocks of the chain the chosen worker holds
    peer: tuple[str, int] | None  # (holder, leading blocks it holds) to fetch from
    reason: str  # cache | load | fallback | round_robin | least_loaded
    best_blocks: int  # most blocks any live worker holds (for miss accounting)


class Policy(Protocol):
    name: str

    def place(self, x: PlacementInput) -> Placement: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def place(self, x: PlacementInput) -> Placement:
        w = x.workers[next(self._counter) % len(x.workers)]
        return Placement(w, _held(x, w)[0], None, self.name, _best(x))


class LeastLoaded:
    name = "least_loaded"

    def __init__(self) -> None:
        self._rr = RoundRobin()

    def place(self, x: PlacementInput) -> Placement:
        low = min(x.inflight.get(w, 0) for w in x.workers)
        tied = [w for w in x.workers if x.inflight.get(w, 0) == low]
        w = self._rr.place(PlacementInput(x.prompt_tokens, x.block_size, x.chain, tied, x.inflight, None)).worker_id
        return Placement(w, _held(x, w)[0], None, self.name, _best(x))


class CacheAware:
    name = "cache_aware"

    duplicate_weight = 1.0  # extra cost per token recomputed that another worker already has

    def __init__(self, *, peer_fetch: bool = True, fallback_load_cap: int = 2):
        self.peer_fetch = peer_fetch
        self.fallback_load_cap = fallback_load_cap
        self._rr = RoundRobin()

    def place(self, x: PlacementInput) -> Placement:
        """The worker of least (estimated cost, in-flight, prefixes, rotated position), as scoring
        every worker would, but scoring only those holding or computing part of the chain and, of
        each cost profile, the one idle worker that can win (`_least_queued`)."""
        if x.holdings is None:
            return self._fallback(x)
        live = set(x.workers) if x.holdings or x.predicted else set()
        actual = {h.worker_id: h for h in x.holdings if h.worker_id in live and h.blocks > 0}
        expect = {w: usable_blocks(x, h) for w, h in actual.items()}  # only holders: the rest have 0
        for w, b in x.predicted.items():
            if b > expect.get(w, 0) and w in live:
                expect[w] = b
        if not expect:
            # Nothing of this prompt is cached anywhere: a new prefix goes where it queues least, then
            # where the fewest distinct prefixes live, so prefixes (not requests) are spread evenly and
            # each worker's cache holds its share of the working set.
            return Placement(_fewest(x, _rotated(x, range(len(x.workers)))), 0, None, "load", 0)
        top = _top_two(expect)
        best = max((h.blocks for h in x.holdings if h.worker_id in live), default=0)  # _best, without a list scan
        scored = []
        blocks = len(x.chain)
        for w in expect:
            elsewhere = top[0][0] if top[0][1] != w else top[1][0]
            cost, placement = self._estimate(x, w, actual, expect, elsewhere, best)
            scored.append((cost + x.extra_s(w, blocks - placement.local_blocks), placement))
        for part in _profiles(x):
            order = _rotated(x, part)
            some = next(itertools.filterfalse(expect.__contains__, order), None)
            if some is None:
                continue
            # Idle workers of one profile share every cost term but the queue (elsewhere: the most any
            # worker has, as none of them is in `top`), so the one that can win is found among their
            # queues. Searched among the holders too, which cannot change an idle winner; when a
            # holder wins that search, again without them.
            # (an idle worker holds nothing: it writes every block of the chain)
            cost, placement = self._estimate(x, some, actual, expect, top[0][0], best)
            w = _least_queued(x, order, cost, blocks)
            if w in expect:
                w = _least_queued(x, list(itertools.filterfalse(expect.__contains__, order)), cost, blocks)
            scored.append((cost + x.extra_s(w, blocks), placement._replace(worker_id=w)))
        return _cheapest(x, scored)

    def _estimate(
        self,
        x: PlacementInput,
        w: str,
        actual: Mapping[str, Holding],
        expect: Mapping[str, int],
        elsewhere: int,
        best: int,
    ) -> tuple[float, Placement]:
        """Seconds to first token on `w` but for the work queued there (the caller adds
        `x.queue_s(w)`, last, as the sum always was), and the placement on it."""
        c = x.costs.get(w, DEFAULT_COSTS)
        local = expect.get(w, 0)
        held = actual.get(w)
        on_host = held.blocks - held.device_blocks - held.disk_blocks if held else 0
        # Its disk-only tail is read when `usable_blocks` counted it (predicted to hold more: the
        # requests placed there before this one read or recompute it first).
        read = held.disk_blocks if held and held.disk_blocks and local == held.blocks else 0
        peer, fetch = None, 0
        if self.peer_fetch:
            # only what the index shows can be fetched; predictions are not computed yet
            others = [h for h in actual.values() if h.worker_id != w and h.blocks > local]
            if others:
                top = max(others, key=lambda h: (h.blocks, -x.inflight.get(h.worker_id, 0)))
                extra = top.blocks - local
                if c.fetch_pays(extra, x.block_size):
                    peer, fetch = (top.worker_id, top.blocks), extra
        cached_tokens = min((local + fetch) * x.block_size, x.prompt_tokens - 1)
        # Blocks another worker holds (or is computing) that this one would compute again (`elsewhere`:
        # the most any other worker has): that time is lost to the cluster too, so it weighs against
        # spreading a burst.
        duplicated = max(0, elsewhere - local - fetch) * x.block_size
        cost = (
            c.prefill_s(x.prompt_tokens - cached_tokens)
            + self.duplicate_weight * c.prefill_s(duplicated)
            + on_host * c.promote_s_per_block
            + c.disk_read_s(read)
            + c.fetch_s(fetch)
        )
        reason = "cache" if local or fetch else "load"
        return cost, Placement(w, local, peer, reason, best)

    def _fallback(self, x: PlacementInput) -> Placement:
        """Index down: rendezvous-hash the first block so a prefix sticks to one worker."""
        if not x.chain:
            w = LeastLoaded().place(x).worker_id
            return Placement(w, 0, None, "fallback", 0)
        first = bytes(x.chain[0])
        ranked = sorted(x.workers, key=lambda w: hashlib.blake2b(first + w.encode(), digest_size=8).digest())
        low = min(x.inflight.get(w, 0) for w in x.workers)
        for w in ranked:
            if x.inflight.get(w, 0) <= low + self.fallback_load_cap:
                return Placement(w, 0, None, "fallback", 0)
        return Placement(ranked[0], 0, None, "fallback", 0)


POLICIES: dict[str, type] = {cls.name: cls for cls in (CacheAware, RoundRobin, LeastLoaded)}
DEFAULT_POLICY = CacheAware.name  # what a service routes with unless told otherwise


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}") from None


def usable_blocks(x: PlacementInput, h: Holding) -> int:
    """Leading blocks of a holding that would serve a request on its worker: its disk-only tail
    counts only where reading it beats recomputing it (that worker's measured costs; unmeasured:
    never), as the worker itself decides when the request arrives."""
    if h.disk_blocks and not x.costs.get(h.worker_id, DEFAULT_COSTS).disk_read_pays(h.disk_blocks, x.block_size):
        return h.blocks - h.disk_blocks
    return h.blocks


def _top_two(expect: Mapping[str, int]) -> list[tuple[int, str | None]]:
    """The two largest (blocks, worker) of `expect`, padded with (0, None): O(workers), so the most
    blocks any *other* worker has is known for every worker without an O(workers^2) scan."""
    top: list[tuple[int, str | None]] = [(0, None), (0, None)]
    for w, b in expect.items():
        if b > top[0][0]:
            top = [(b, w), top[0]]
        elif b > top[1][0]:
            top[1] = (b, w)
    return top


def _profiles(x: PlacementInput) -> Sequence[Sequence[int]]:
    """Positions of the candidates of each cost profile: `x.profiles` when the caller keeps them,
    else grouped here by object identity (the router interns equal profiles; two equal profiles in
    two parts only add a candidate to score)."""
    if x.profiles is not None:
        return x.profiles
    parts: dict[int, list[int]] = {}
    for i, w in enumerate(x.workers):
        parts.setdefault(id(x.costs.get(w, DEFAULT_COSTS)), []).append(i)
    return list(parts.values())


def _rotated(x: PlacementInput, positions: Sequence[int]) -> list[str]:
    """The workers at ascending `positions`, from the first at or after `turn` on, wrapping round:
    in order of (position - turn) % n, the last tie-break, so a first-minimum search honours it."""
    k = bisect.bisect_left(positions, x.turn % len(x.workers))
    if isinstance(positions, range) and positions.step == 1:  # consecutive (one profile): 2 slices
        lo, hi = positions.start, positions.stop
        return [*x.workers[lo + k : hi], *x.workers[lo : lo + k]]
    return list(map(x.workers.__getitem__, itertools.chain(positions[k:], positions[:k])))


def _least_queued(x: PlacementInput, workers: list[str], cost: float, written: int) -> str:
    """Of `workers` (in rotated order), each costing `cost` plus `extra_s(w, written)` (its queue and
    churn), the one a scan scoring each would pick: least round(cost + extra, 9), then in-flight,
    prefixes, rotated position. Done in C-level passes (map, min, count, filter), as a Python loop
    scoring each of 1,000 workers would be most of a placement."""
    if x.churn_s and written:
        return _least_queued_churned(x, workers, cost, written)
    idle_near = 1e-6 if math.isfinite(cost) else math.inf  # `near` below, when the least queue is 0
    if x.load_s is not None and min(x.load_s.values(), default=math.inf) >= idle_near:
        # Queues absent from load_s are 0 and every one present is too long to tie with 0: the ties
        # are the absent ones (a lightly loaded cluster: most workers), found without a lookup each.
        free = list(itertools.filterfalse(x.load_s.__contains__, workers))
        if free:
            return _fewest(x, free)
    if x.load_s is None:
        queued = [x.queue_s(w) for w in workers]
    else:
        queued = list(map(x.load_s.get, workers, itertools.repeat(0.0)))
    low = min(queued)
    # Costs that round alike differ by under 1e-9 s (plus float error of the sums, far below 1e-6 s
    # for costs under a million seconds), so a queue 1e-6 s above the least cannot tie with it.
    near = low + 1e-6 if math.isfinite(cost + low) else math.inf
    if min(filter(functools.partial(operator.lt, low), queued), default=math.inf) < near:  # rare
        least = round(cost + low, 9)
        tied = [w for w, q in zip(workers, queued) if q == low or (q < near and round(cost + q, 9) == least)]
    elif queued.count(low) == 1:
        return workers[queued.index(low)]
    else:
        tied = list(itertools.compress(workers, map(operator.eq, queued, itertools.repeat(low))))
    return _fewest(x, tied)


def _least_queued_churned(x: PlacementInput, workers: list[str], cost: float, written: int) -> str:
    """`_least_queued` when some workers' writes are priced: a worker absent from both the load and
    the churn prices adds nothing, so when any such is among `workers` and every priced one adds
    more than 1e-6 s (it cannot tie once rounded), the least of those free ones wins; else score."""
    priced = x.churn_s.keys() | (x.load_s.keys() if x.load_s is not None else ())
    extra = {w: x.extra_s(w, written) for w in priced}
    if x.load_s is None:
        free = []  # in-flight x service_s: every worker is priced by its count
    else:
        free = list(itertools.filterfalse(priced.__contains__, workers))
    if free and min(extra.values(), default=math.inf) >= (1e-6 if math.isfinite(cost) else math.inf):
        return _fewest(x, free)
    totals = [round(cost + (extra[w] if w in extra else x.extra_s(w, written)), 9) for w in workers]
    low = min(totals)
    return _fewest(x, list(itertools.compress(workers, map(operator.eq, totals, itertools.repeat(low)))))


def _fewest(x: PlacementInput, workers: list[str]) -> str:
    """The first of `workers` (in rotated order) of least in-flight, then prefixes: per count a
    C-level map, min and count, and a filter only when some have more than the least."""
    for counts in (x.inflight, x.prefixes):
        if len(workers) == 1:
            break
        values = list(map(counts.get, workers, itertools.repeat(0)))
        low = min(values)
        ties = values.count(low)
        if ties == 1:
            return workers[values.index(low)]
        if ties < len(values):
            workers = list(itertools.compress(workers, map(operator.eq, values, itertools.repeat(low))))
    return workers[0]


def _rotated_first(x: PlacementInput, workers: list[str]) -> str:
    """Of `workers` (few), the one of least (position - turn) % n in `x.workers`: the first found
    scanning from position `turn` on, wrapping round."""
    if len(workers) == 1:
        return workers[0]
    want = set(workers)
    t = x.turn % len(x.workers)
    return next(w for w in itertools.chain(x.workers[t:], x.workers[:t]) if w in want)


def _cheapest(x: PlacementInput, scored: list[tuple[float, Placement]]) -> Placement:
    """The placement of least (round(cost, 9), in-flight, prefixes, rotated position)."""
    best_key, picks = None, []
    for cost, p in scored:
        key = (round(cost, 9), x.inflight.get(p.worker_id, 0), x.prefixes.get(p.worker_id, 0))
        if best_key is None or key < best_key:
            best_key, picks = key, [p]
        elif key == best_key:
            picks.append(p)
    w = _rotated_first(x, [p.worker_id for p in picks])
    return next(p for p in picks if p.worker_id == w)


def _held(x: PlacementInput, w: str) -> tuple[int, int]:
    for h in x.holdings or ():
        if h.worker_id == w:
            return h.blocks, h.device_blocks
    return 0, 0


def _best(x: PlacementInput) -> int:
    return max((h.blocks for h in x.holdings or () if h.worker_id in x.workers), default=0)
