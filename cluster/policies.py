"""Placement policies: given who holds how much of a prompt, and who is busy, pick a worker.

A policy is a pure function of a `PlacementInput`, so it is tested without
Ray or Redis and benchmarks can swap policies by name:

    cache_aware    minimise estimated time to first token: uncached prefill
                   + promotion of host-tier blocks + peer fetch (when the
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

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from cache_store import BlockHash, Holding
from worker.costs import CostModel


@dataclass(frozen=True)
class PlacementInput:
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

    def queue_s(self, worker: str) -> float:
        if self.load_s is not None:
            return self.load_s.get(worker, 0.0)
        return self.inflight.get(worker, 0) * self.service_s


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
        if x.holdings is None:
            return self._fallback(x)
        actual = {h.worker_id: h for h in x.holdings if h.worker_id in x.workers and h.blocks > 0}
        expect = {w: max(actual[w].blocks if w in actual else 0, x.predicted.get(w, 0)) for w in x.workers}
        n = len(x.workers)
        if not any(expect.values()):
            # Nothing of this prompt is cached anywhere: a new prefix goes where it queues least, then
            # where the fewest distinct prefixes live, so prefixes (not requests) are spread evenly and
            # each worker's cache holds its share of the working set.
            w = min(
                enumerate(x.workers),
                key=lambda iw: (x.inflight.get(iw[1], 0), x.prefixes.get(iw[1], 0), (iw[0] - x.turn) % n),
            )[1]
            return Placement(w, 0, None, "load", 0)
        top = _top_two(expect)
        best_key, best = None, None
        for i, w in _shortlist(x, expect):
            elsewhere = top[0][0] if top[0][1] != w else top[1][0]
            cost, placement = self._estimate(x, w, actual, expect, elsewhere)
            key = (round(cost, 9), x.inflight.get(w, 0), x.prefixes.get(w, 0), (i - x.turn) % n)
            if best_key is None or key < best_key:
                best_key, best = key, placement
        return best

    def _estimate(
        self, x: PlacementInput, w: str, actual: Mapping[str, Holding], expect: Mapping[str, int], elsewhere: int
    ) -> tuple[float, Placement]:
        c = x.costs.get(w, CostModel())
        local = expect[w]
        on_host = actual[w].blocks - actual[w].device_blocks if w in actual else 0
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
            + c.fetch_s(fetch)
            + x.queue_s(w)
        )
        reason = "cache" if local or fetch else "load"
        return cost, Placement(w, local, peer, reason, _best(x))

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


def _shortlist(x: PlacementInput, expect: Mapping[str, int]) -> list[tuple[int, str]]:
    """(position, worker) pairs that can win: every worker holding or computing part of the chain,
    and, among the rest, the least loaded of each cost profile. Workers without a block of the chain
    and with equal costs differ only in load (their cache terms are identical), so the others cannot
    win; at 1,000 workers this keeps a placement to the holders plus a few."""
    n = len(x.workers)
    out: list[tuple[int, str]] = []
    idle: dict[CostModel, tuple[tuple, int, str]] = {}
    for i, w in enumerate(x.workers):
        if expect.get(w, 0) > 0:
            out.append((i, w))
            continue
        c = x.costs.get(w, CostModel())
        key = (x.inflight.get(w, 0), x.prefixes.get(w, 0), (i - x.turn) % n)
        if c not in idle or key < idle[c][0]:
            idle[c] = (key, i, w)
    out += [(i, w) for _, i, w in idle.values()]
    return out


def _held(x: PlacementInput, w: str) -> tuple[int, int]:
    for h in x.holdings or ():
        if h.worker_id == w:
            return h.blocks, h.device_blocks
    return 0, 0


def _best(x: PlacementInput) -> int:
    return max((h.blocks for h in x.holdings or () if h.worker_id in x.workers), default=0)
