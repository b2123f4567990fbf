"""Router: tokenizes, asks the index once who holds the prompt's prefix, places the request.

`Router` is a plain class (tokenizer + index + policy + in-flight
accounting), tested without Ray. `RouterService` (cluster/service/router_actor.py)
is the async Ray actor around it that forwards requests to workers and
retries on another worker when one dies.
"""

from __future__ import annotations

import hashlib
import heapq
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import NamedTuple

from cache_store import BlockHash, Counters, Holding, IndexUnavailable, MetadataIndex, block_chain, root_hash
from cache_store.counter_names import (
    COLD_REQUESTS,
    EVICTED,
    HELD_ELSEWHERE,
    NEVER_SEEN,
    PEER_HINTS,
    PLACEMENT_INDEX_DOWN,
    ROUTED,
    PrefixKey,
    miss_tokens,
    placements,
    request_counts,
    tenant_counter,
)
from cluster.routing.churn import CacheChurn
from cluster.routing.policies import Placement, PlacementInput, Policy
from worker.costs import DEFAULT_COSTS, CostModel
from worker.request import ErrorKind, Problem, Request, prompt_ids_problem

SEEN_CAPACITY = 200_000  # block hashes remembered to tell "evicted" from "never seen"
# Write rates (blocks a worker was sent to cache) are compared over this time constant (seconds): long
# enough to span a conversation's think time between turns, whose blocks a fast-churning cache loses.
CHURN_TAU_S = 120.0


class Plan(NamedTuple):
    token_ids: list[int]
    chain: list[BlockHash]
    placement: Placement
    holdings: list[Holding] | None  # what the index said (None: unreachable)


def tenant_label(cache_salt: str | None) -> str:
    """How a tenant appears on dashboards: a short hash of its salt, never the salt itself."""
    if cache_salt is None:
        return "none"
    return hashlib.blake2b(cache_salt.encode(), digest_size=6, person=b"pfx-tenant").hexdigest()


class NoWorker(Exception):
    """No live worker is left to place a request on."""


class Router:
    """Placement with honest bookkeeping. Thread-safe (the actor calls it from worker threads)."""

    def __init__(
        self,
        *,
        tokenizer,
        fingerprint: str,
        block_size: int,
        max_context: int,
        vocab_size: int,
        index: MetadataIndex | None,
        policy: Policy,
        workers: Sequence[str],
    ):
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.index = index
        self.policy = policy
        self.workers = list(workers)
        self.alive = set(workers)
        self.inflight: Counter[str] = Counter()
        self.costs: dict[str, CostModel] = {}
        self.service_s: float | None = None  # mean seconds a request occupies a worker (EMA)
        self.counters = Counters()
        # Hashes some worker was seen holding: a later miss on one of them was an eviction.
        self._held_once: OrderedDict[bytes, None] = OrderedDict()
        # Blocks that requests in flight will have computed: hash -> {worker: requests}. Until the
        # index shows them, a burst sharing a new prefix is steered by these; they end with the
        # request (then the index, or an eviction, is the truth).
        self._pending: dict[bytes, dict[str, int]] = {}  # plain dicts: a Counter costs 1 us to build
        # First blocks of recent placements -> workers: how many distinct prefixes each worker serves.
        self._roots: OrderedDict[bytes, set[str]] = OrderedDict()
        self._prefixes: Counter[str] = Counter()
        self._turn = 0
        self._prefix_hits: Counter[str] = Counter()  # PrefixKey member -> hits, unflushed
        # In-flight work per placement: id(plan) -> (worker, when its estimated prefill ends). Per
        # worker, the ends not yet passed (a heap) and, where in-flight requests reach the engine's
        # batch size, (requests over it + 1, batch size), also as the workers of each such pair:
        # `_load_s` reads these, not every request (nor, mostly, every worker).
        self._work: dict[int, tuple[str, float]] = {}
        self._ends: dict[str, list[float]] = {}
        self._expiry: list[tuple[float, str]] = []  # (end, worker), to drop ends as time passes them
        self._over: dict[str, tuple[int, int]] = {}
        self._over_by: dict[tuple[int, int], set[str]] = {}
        # Read-only views the policy reads under the lock, instead of a copy per placement.
        self._views = tuple(map(MappingProxyType, (self.inflight, self.costs, self._prefixes)))
        self._live: tuple[list[str], list[Sequence[int]]] | None = None  # cached by `_candidates`
        self._profiles: dict[CostModel, CostModel] = {}  # one object per distinct cost profile
        self._default_s: float | None = None  # cached by `_default_service_s`
        # Blocks each worker was sent to cache, as prices per block written (cluster/routing/churn.py)
        self.churn = CacheChurn(self._block_s, CHURN_TAU_S)
        self.churn.set_live(len(self.alive))
        self.clock = time.monotonic  # seconds; replaceable so tests can move time
        self._lock = threading.Lock()

    # ---- planning --------------------------------------------------------------

    def prepare(self, req: Request) -> tuple[list[int], list[BlockHash]] | Problem:
        """Token ids and block chain of a request, or what is wrong with it."""
        message = req.problem()
        if message:
            return Problem(ErrorKind.BAD_REQUEST, message)
        ids = list(self.tokenizer(req.prompt)["input_ids"]) if isinstance(req.prompt, str) else list(req.prompt)
        problem = prompt_ids_problem(ids, req.max_new_tokens, self.vocab_size, self.max_context)
        if problem:
            return problem
        return ids, block_chain(root_hash(self.fingerprint, req.cache_salt), ids, self.block_size)

    def place(self, ids: list[int], chain: list[BlockHash], exclude: Iterable[str] = ()) -> Plan:
        """Pick a live worker not in `exclude` (one index round trip) and count the request as in
        flight there; the caller must call `finished(worker, ...)` once it is done.

        The index is read outside the lock; the decision and the in-flight increment are one
        step under it, so a burst of concurrent placements sees each other's load.
        """
        excluded = set(exclude)
        with self._lock:
            if not self._candidates(excluded)[0]:
                raise NoWorker(
                    f"no live worker to serve the request (workers: {self.workers}, excluded: {sorted(excluded)})"
                )
        holdings = None
        if self.index is not None:
            try:
                holdings = self.index.holders(chain)
            except IndexUnavailable:
                self.counters.add(PLACEMENT_INDEX_DOWN)
        with self._lock:
            candidates, profiles = self._candidates(excluded)
            if not candidates:
                raise NoWorker(f"no live worker to serve the request (workers: {self.workers})")
            predicted = self._predicted(chain, excluded) if holdings is not None else {}
            service_s = self.service_s if self.service_s is not None else self._default_service_s()
            self._turn += 1
            inflight, costs, prefixes = self._views
            load = self._load_s(service_s)
            x = PlacementInput(
                len(ids),
                self.block_size,
                chain,
                candidates,
                inflight,
                holdings,
                costs,
                service_s,
                prefixes,
                self._turn,
                predicted,
                load,
                profiles,
                self.churn if self.churn else None,
            )
            placement = self.policy.place(x)
            w = placement.worker_id
            # every chain block the worker lacks is written there, fetched copies included
            self.churn.note(w, len(chain) - placement.local_blocks, self.clock())
            self.inflight[w] += 1
            self._note_over(w)
            self._remember(chain, w, holdings)
            plan = Plan(ids, chain, placement, holdings)
            self._add_work(plan, self.clock() + self._prefill_s(plan))
        self.counters.add(ROUTED)
        self.counters.add(placements(placement.reason))
        if placement.peer is not None:
            self.counters.add(PEER_HINTS)
        return plan

    def _candidates(self, excluded: set[str]) -> tuple[list[str], list[Sequence[int]] | None]:
        """(Lock held.) Live workers not excluded, and the positions among them of each cost
        profile's workers. Without exclusions (the usual case) both are kept until a worker or its
        costs change, not rebuilt per placement; nobody may mutate them. With exclusions (retries)
        the policy splits the candidates itself."""
        if self._live is None:
            live = [w for w in self.workers if w in self.alive]
            parts: dict[int, list[int]] = {}
            for i, w in enumerate(live):
                parts.setdefault(id(self.costs.get(w, DEFAULT_COSTS)), []).append(i)
            # one profile (equal hardware): a range, which the policy rotates by slicing
            self._live = live, list(parts.values()) if len(parts) > 1 else [range(len(live))]
        if not excluded:
            return self._live
        return [w for w in self._live[0] if w not in excluded], None

    def _prefill_s(self, plan: Plan) -> float:
        """(Lock held.) Estimated prefill seconds of a placed request on its worker."""
        p = plan.placement
        cost = self.costs.get(p.worker_id, DEFAULT_COSTS)
        local = max(p.local_blocks, p.peer[1] if p.peer else 0) * self.block_size
        return cost.prefill_s(max(1, len(plan.token_ids) - local))

    def _load_s(self, service_s: float) -> dict[str, float]:
        """(Lock held.) Seconds a new request waits on each worker before its own prefill runs.

        A batching engine shares every step among its running requests, so what delays a newcomer
        is the prefill still queued ahead (each in-flight request's estimated prefill, minus the
        time it has been running) and, once more requests are in flight than the engine batches
        (`max_running`, measured at start-up), the turnover of those extra requests.

        Only workers with something queued appear (the others wait 0 s). Read from per-worker
        state (`_over_by`, `_ends`): one C-level fill per (over, batch) pair, then a Python step per
        worker with prefill still running, not one per request in flight."""
        now = self.clock()
        self._expire(now)
        load: dict[str, float] = {}
        for (n, batch), workers in self._over_by.items():
            load.update(dict.fromkeys(workers, n * service_s / batch))
        for w, ends in self._ends.items():
            # the prefills not yet done, each end - now = prefill_s - (now - placed)
            load[w] = load.get(w, 0.0) + (sum(ends) - len(ends) * now)
        return load

    def _add_work(self, plan: Plan, end: float) -> None:
        """(Lock held.) A placed request whose prefill is estimated to end at `end` (clock time)."""
        w = plan.placement.worker_id
        self._work[id(plan)] = (w, end)
        heapq.heappush(self._ends.setdefault(w, []), end)
        heapq.heappush(self._expiry, (end, w))

    def _drop_work(self, plan: Plan) -> None:
        """(Lock held.) The request left its worker: its prefill, if still counted, no longer is."""
        w, end = self._work.pop(id(plan), (None, 0.0))
        ends = self._ends.get(w)
        if ends and end in ends:
            ends.remove(end)
            heapq.heapify(ends)
            if not ends:
                del self._ends[w]

    def _expire(self, now: float) -> None:
        """(Lock held.) Forget prefill ends the clock has passed (each once: the expiry heap holds
        every end, including those of requests that already finished)."""
        while self._expiry and self._expiry[0][0] <= now:
            w = heapq.heappop(self._expiry)[1]
            ends = self._ends.get(w)
            while ends and ends[0] <= now:
                heapq.heappop(ends)
            if ends is not None and not ends:
                del self._ends[w]

    def _note_over(self, w: str) -> None:
        """(Lock held.) Keep `_over`/`_over_by` in step with w's in-flight count and batch size."""
        batch = self.costs.get(w, DEFAULT_COSTS).max_running
        over = self.inflight.get(w, 0) - batch
        pair = (over + 1, max(1, batch)) if over >= 0 else None
        old = self._over.pop(w, None)
        if old is not None:
            self._over_by[old].discard(w)
            if not self._over_by[old]:
                del self._over_by[old]
        if pair is not None:
            self._over[w] = pair
            self._over_by.setdefault(pair, set()).add(w)

    def _predicted(self, chain, excluded: set[str]) -> dict[str, int]:
        """(Lock held.) Leading blocks of `chain` that requests in flight will leave on each worker.

        Walks the chain once, narrowing the set of workers whose run continues (as the index's
        holders script does), so the cost follows the pending workers, not the cluster size."""
        out: dict[str, int] = {}
        live: set[str] = set()
        for i, h in enumerate(chain):
            pending = self._pending.get(bytes(h))  # its counts are all > 0: `finished` drops the rest
            if i and pending and len(pending) == len(live):
                # A chain is a hash chain: a request counted on block i is counted on every block
                # before it, so block i's workers are among block i-1's; as many means the same.
                continue
            now = (live & pending.keys() if i else set(pending)) if pending else set()
            for w in live - now:  # their run ends before block i
                out[w] = i
            if not now:
                break
            live = now
        else:
            out.update(dict.fromkeys(live, len(chain)))
        return {w: n for w, n in out.items() if w in self.alive and w not in excluded}

    def _remember(self, chain, worker: str, holdings: list[Holding] | None) -> None:
        """(Lock held.) Record a placement for predictions and the hashes seen held."""
        best = max((h.blocks for h in holdings or ()), default=0)
        for h in chain:
            key = bytes(h)
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = pending = {}
            pending[worker] = pending.get(worker, 0) + 1
        if chain:
            root = self._roots.setdefault(bytes(chain[0]), set())
            if worker not in root:
                root.add(worker)
                self._prefixes[worker] += 1
            self._roots.move_to_end(bytes(chain[0]))
            while len(self._roots) > SEEN_CAPACITY:
                for w in self._roots.popitem(last=False)[1]:
                    self._prefixes[w] -= 1
        for h in chain[:best]:
            key = bytes(h)
            self._held_once[key] = None
            self._held_once.move_to_end(key)
        while len(self._held_once) > SEEN_CAPACITY:
            self._held_once.popitem(last=False)

    def account(self, plan: Plan, cached_tokens: int, cache_salt: str | None = None) -> None:
        """After a result: per-tenant counters, the prefix that hit, and why the rest missed.

        Miss reasons, token-weighted, for every full prompt block not served from cache:
        held_elsewhere: a live worker held it, but this request ran elsewhere (load, or a fetch
        that did not pay); evicted: some worker held it before, none does now; never_seen:
        content no worker has held (e.g. each user's own question).
        """
        chain, bs = plan.chain, self.block_size
        tenant = tenant_label(cache_salt)
        covered = -(-cached_tokens // bs)  # a whole cached prompt recomputes its last token by design
        counts = request_counts(len(plan.token_ids), cached_tokens)
        self.counters.add_many({tenant_counter(tenant, k): v for k, v in counts.items()})
        if covered and chain:
            last = min(covered, len(chain))
            with self._lock:
                self._prefix_hits[PrefixKey(chain[last - 1].hex(), last * bs, tenant).member()] += 1
        if plan.holdings is None or covered >= len(chain):
            return
        best = max((h.blocks for h in plan.holdings if h.worker_id in self.alive), default=0)
        reasons: Counter[str] = Counter()
        with self._lock:
            for i in range(covered, len(chain)):
                if i < best:
                    reasons[HELD_ELSEWHERE] += bs
                elif bytes(chain[i]) in self._held_once:
                    reasons[EVICTED] += bs
                else:
                    reasons[NEVER_SEEN] += bs
        self.counters.add_many({miss_tokens(k): v for k, v in reasons.items()})
        if cached_tokens == 0:
            self.counters.add(COLD_REQUESTS)

    def take_prefix_hits(self) -> Counter[str]:
        """Hand the prefix hits recorded since the last call to the flusher (put them back on failure)."""
        with self._lock:
            hits, self._prefix_hits = self._prefix_hits, Counter()
        return hits

    def restore_prefix_hits(self, hits: Counter[str]) -> None:
        with self._lock:
            self._prefix_hits.update(hits)

    # ---- bookkeeping -------------------------------------------------------------

    def finished(self, plan: Plan, service_s: float | None) -> None:
        """The planned request left its worker; `service_s` is how long it occupied it (None if it failed)."""
        worker = plan.placement.worker_id
        with self._lock:
            self._drop_work(plan)
            self.inflight[worker] -= 1
            if self.inflight[worker] <= 0:
                del self.inflight[worker]
            self._note_over(worker)
            for h in plan.chain:
                key = bytes(h)
                pending = self._pending.get(key)
                if pending is not None:
                    left = pending.get(worker, 0) - 1
                    if left > 0:
                        pending[worker] = left
                    else:
                        pending.pop(worker, None)
                        if not pending:
                            del self._pending[key]
            if service_s is not None:
                prev = self.service_s
                self.service_s = service_s if prev is None else 0.9 * prev + 0.1 * service_s

    def _block_s(self, worker: str) -> float:
        """(Lock held.) Seconds `worker` takes to recompute one block."""
        return self.costs.get(worker, DEFAULT_COSTS).prefill_s(self.block_size)

    def _default_service_s(self) -> float:
        """Before any request finished: assume a 512-token prefill (lock held; kept until costs change)."""
        if self._default_s is None:
            rates = [c.prefill_s_per_token for c in self.costs.values()] or [DEFAULT_COSTS.prefill_s_per_token]
            self._default_s = 512 * sum(rates) / len(rates)
        return self._default_s

    def mark_dead(self, worker: str) -> None:
        with self._lock:
            if worker in self.alive:
                self.alive.discard(worker)
                self._live = None
                self.churn.forget(worker)
                self.churn.set_live(len(self.alive))

    def mark_alive(self, worker: str) -> None:
        """(The health loop calls this for every live worker every beat: a no-op unless it was dead.)"""
        with self._lock:
            if worker in self.workers and worker not in self.alive:
                self.alive.add(worker)
                self._live = None
                self.churn.set_live(len(self.alive))

    def add_worker(self, worker: str) -> None:
        with self._lock:
            if worker not in self.workers:
                self.workers.append(worker)
            self.alive.add(worker)
            self._live = None
            self.churn.set_live(len(self.alive))

    def set_costs(self, worker: str, costs: CostModel) -> None:
        """Score `worker` with `costs.rounded()` (why: worker/costs.py). Equal profiles are one
        object, which placement groups by."""
        rounded = costs.rounded()
        with self._lock:
            profile = self._profiles.setdefault(rounded, rounded)
            if self.costs.get(worker) is profile:
                return  # the periodic refresh, nothing changed: keep the cached candidates
            self.costs[worker] = profile
            self._note_over(worker)
            self._live = self._default_s = None
