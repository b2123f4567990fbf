"""RouterService: one router replica, a named async Ray actor in front of the workers.

It places each request with `Router` (tokenize + one index lookup, run off
the event loop), forwards it to the chosen worker with a peer-fetch hint,
and retries on another worker if the chosen one dies. A background loop
checks worker health, refreshes their measured costs and flushes the
router's counters. Async methods only await; blocking work (tokenizer,
Redis) runs in threads via `asyncio.to_thread`. A service runs one or more
replicas (`ServiceSpec.routers`); clients deal requests to them with
`cluster.service.replica_for`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import ray

from cache_store import IndexUnavailable, MetadataIndex
from cache_store.counter_names import FAILED_NO_WORKER, REJECTED, RETRIES, ROUTER, WORKER_ERRORS
from cluster.routing.policies import make_policy
from cluster.routing.router import NoWorker, Plan, Router
from cluster.service.history import record_history
from cluster.service.lookup import find_router, running_worker_ids
from cluster.service.spec import ServiceError, ServiceSpec, redis_name
from cluster.service.stats import summarize
from worker.costs import CostModel
from worker.names import NAMESPACE, worker_actor_name
from worker.request import MAX_TENANT_CHARS, Chunk, ErrorKind, Problem, Request, Result

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 5.0
RESET_TIMEOUT_S = 60.0  # a worker empties its cache between engine steps


class RouterService:
    """One router replica. Replicas share the index and keep their own in-flight counts; replica 0
    also records history, calibrates transfers and stops the workers. Every public method first
    makes sure `start` ran: a replica that Ray restarted starts again on its first call."""

    def __init__(
        self, spec: dict, workers: list[str], redis_url: str, health_interval_s: float = 2.0, replica: int = 0
    ):
        self.spec = ServiceSpec.from_dict(spec)
        self.replica = replica
        self.worker_ids = list(workers)
        self.handles: dict[str, Any] = {}
        self.redis_url = redis_url
        self.index = MetadataIndex(redis_url, self.spec.cache_config())
        self.health_interval_s = health_interval_s
        self.router: Router | None = None
        self.started_at = time.time()
        self._tasks: list[asyncio.Task] = []
        self._tenant_key = b""
        self._start_lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------------

    async def start(self) -> dict:
        await self._ready()
        return await self.config()

    async def _ready(self) -> None:
        if self.router is not None:
            return
        async with self._start_lock:
            if self.router is None:
                await self._start()

    async def _start(self) -> None:
        found = await asyncio.to_thread(running_worker_ids, self.spec.service)
        ids = list(dict.fromkeys([*self.worker_ids, *found]))
        self.handles, infos = await self._reachable(ids)
        fingerprints = {i["fingerprint"] for i in infos}
        if len(fingerprints) != 1:
            raise RuntimeError(
                f"workers disagree on the model fingerprint {sorted(fingerprints)}; one model per service"
            )
        info = infos[0]
        from worker.models import load_tokenizer  # transformers (and with it torch): at start, not on import

        tokenizer = await asyncio.to_thread(load_tokenizer, self.spec.model)
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self.spec = await asyncio.to_thread(self._current_spec)
        router = Router(
            tokenizer=tokenizer,
            fingerprint=info["fingerprint"],
            block_size=info["block_size"],
            max_context=info["max_context"],
            vocab_size=info["vocab_size"],
            index=self.index,
            policy=make_policy(self.spec.policy),
            workers=list(self.handles),
        )
        self._tenant_key = await asyncio.to_thread(self._load_tenant_key)
        if self.replica == 0:
            await asyncio.to_thread(self.index.set_service_info, self._service_info(info))
            await self._calibrate()
        self.router = router
        await self._refresh()
        self._tasks.append(asyncio.create_task(self._background()))

    async def _reachable(self, ids: list[str]) -> tuple[dict[str, Any], list[dict]]:
        """Handles and infos of the workers among `ids` that answer. A replica Ray restarts may find
        some of them dead for good (past their restarts); it starts without them. None: an error."""
        named = await asyncio.to_thread(self._lookup, ids, missing_ok=True)
        infos = await asyncio.gather(*(h.info.remote() for h in named.values()), return_exceptions=True)
        alive = {w: (h, i) for (w, h), i in zip(named.items(), infos) if not isinstance(i, BaseException)}
        if not alive:
            raise RuntimeError(f"no worker of service {self.spec.service!r} answers (looked for {ids})")
        return {w: h for w, (h, _) in alive.items()}, [i for _, i in alive.values()]

    def _service_info(self, info: dict) -> dict:
        return {
            "model": self.spec.model,
            "fingerprint": info["fingerprint"],
            "block_size": info["block_size"],
            "policy": self.spec.policy,
            "workers": list(self.handles),
            "routers": self.spec.routers,
            "started_at": self.started_at,
        }

    def _current_spec(self) -> ServiceSpec:
        """After a restart: the spec with the policy the service runs now (`set_policy` records it in
        the index; the constructor's spec has the one it started with)."""
        try:
            policy = self.index.service_info().get("policy", self.spec.policy)
        except IndexUnavailable:
            return self.spec
        return ServiceSpec.from_dict({**self.spec.to_dict(), "policy": policy})

    def _load_tenant_key(self) -> bytes:
        """A per-service secret for tenant salts, kept in Redis so a restarted router derives the same salts."""
        try:
            return self.index.secret("tenant-salt")
        except IndexUnavailable:
            log.warning("index unreachable at start: tenant salts use a key local to this router")
            return secrets.token_bytes(32)

    def _lookup(self, ids: list[str], *, missing_ok: bool = False) -> dict[str, Any]:
        found = {}
        for w in ids:
            try:
                found[w] = ray.get_actor(worker_actor_name(self.spec.service, w), namespace=NAMESPACE)
            except ValueError:
                if not missing_ok:
                    raise
        return found

    async def add_workers(self, ids: list[str]) -> list[str]:
        await self._ready()
        self.handles.update(await asyncio.to_thread(self._lookup, ids))
        for w in ids:
            self.router.add_worker(w)
        if self.replica == 0:
            await self._calibrate()
        await self._refresh()
        return list(self.handles)

    async def set_policy(self, name: str) -> str:
        await self._ready()
        self.router.policy = make_policy(name)
        self.spec = ServiceSpec.from_dict({**self.spec.to_dict(), "policy": name})
        try:  # for the dashboard, and for a replica that restarts later
            await asyncio.to_thread(self.index.set_service_info, {"policy": name})
        except IndexUnavailable:
            log.warning("index unreachable: a restarted replica would route with its start-up policy")
        return name

    async def shutdown(self) -> list[str]:
        """Stop background work; replica 0 also lets the workers deregister and returns the names of
        the actors to kill (the others return none)."""
        for t in self._tasks:
            t.cancel()
        if self.router is not None:
            await asyncio.to_thread(self._flush_counters)
        if self.replica != 0:
            return []
        if not self.handles:  # restarted and not called since: find the workers by name
            ids = await asyncio.to_thread(running_worker_ids, self.spec.service)
            self.handles = await asyncio.to_thread(self._lookup, ids, missing_ok=True)
        await asyncio.gather(*(self._quiet(h.shutdown.remote()) for h in self.handles.values()))
        if self.spec.redis_url is None:
            try:
                host = ray.get_actor(redis_name(self.spec.service), namespace=NAMESPACE)
                await self._quiet(host.stop.remote())
            except ValueError:
                pass  # the embedded server is already gone
        names = [worker_actor_name(self.spec.service, w) for w in self.handles]
        return names + ([redis_name(self.spec.service)] if self.spec.redis_url is None else [])

    # ---- requests ------------------------------------------------------------------

    async def generate(self, request: dict, tenant: str | None = None) -> dict:
        """Place, forward, retry on worker death. Returns a Result dict; never raises for bad input."""
        result: dict = {}
        async for chunk in self._serve(request, tenant, stream=False):
            result = chunk.result.to_dict()
        return result

    async def stream(self, request: dict, tenant: str | None = None):
        """Like `generate`, yielding `Chunk.to_dict()`s as the worker produces them; the last carries
        the Result. Call with `.options(num_returns="streaming")`.
        Retried on another worker only while nothing has been streamed; cancelling it cancels the
        request on its worker."""
        async for chunk in self._serve(request, tenant, stream=True):
            yield chunk.to_dict()

    async def _serve(self, request: dict, tenant: str | None, *, stream: bool):
        """`Chunk`s: the worker's (streaming only), then one carrying the `Result`."""
        await self._ready()
        req = self._admit(request, tenant)
        if isinstance(req, Result):
            yield _last(req)
            return
        prepared = await asyncio.to_thread(self.router.prepare, req)
        if isinstance(prepared, Problem):
            self.router.counters.add(REJECTED)
            yield _last(Result.refused(prepared, id=req.id))
            return
        ids, chain = prepared
        tried: list[str] = []
        errors: list[str] = []
        while True:
            try:
                plan = await self._place(ids, chain, tried)
            except NoWorker as e:
                self.router.counters.add(FAILED_NO_WORKER)
                detail = f" (after: {'; '.join(errors)})" if errors else ""
                yield _last(Result.failed(f"{e}{detail}", ErrorKind.UNAVAILABLE, id=req.id, prompt_tokens=len(ids)))
                return
            attempt = _Attempt(plan, len(tried) + 1)
            async for chunk in self._forward(req, attempt, stream=stream):
                yield chunk
            if attempt.died is None:
                return
            self.router.counters.add(RETRIES)
            tried.append(plan.placement.worker_id)
            errors.append(f"{plan.placement.worker_id}: {attempt.died}")

    async def _place(self, ids: list[int], chain: list, tried: list[str]) -> Plan:
        """`Router.place` off the event loop. If the caller is cancelled meanwhile, the placement
        still happens in its thread: it is then finished at once, so no in-flight count leaks."""
        placing = asyncio.ensure_future(asyncio.to_thread(self.router.place, ids, chain, tried))
        try:
            return await asyncio.shield(placing)
        except asyncio.CancelledError:
            placing.add_done_callback(self._drop_placement)
            raise

    def _drop_placement(self, placing: asyncio.Future) -> None:
        if not placing.cancelled() and placing.exception() is None:
            self.router.finished(placing.result(), None)

    async def _forward(self, req: Request, attempt: _Attempt, *, stream: bool):
        """One try on the planned worker: its result, after its chunks when streaming. If the worker
        dies before anything was streamed, `attempt.died` says so and nothing is yielded for it: the
        caller retries elsewhere. A caller that stops listening cancels the request there."""
        plan = attempt.plan  # counted in flight on its worker by place(); finished() below, always
        w = plan.placement.worker_id
        args = (req.to_dict(), plan.token_ids, plan.placement.peer)
        attempt.latency = None
        try:
            if stream:
                gen = self.handles[w].stream.options(num_returns="streaming").remote(*args)
                async with aclosing(self._relay(gen)) as chunks:  # closed (and cancelled) with this one
                    async for chunk in chunks:
                        if chunk.result is None:
                            attempt.streamed += 1
                            yield chunk
                            continue
                        yield _last(self._finish(plan, attempt, req, chunk.result))
            else:
                # One message for a whole answer: relaying each token's chunk cost this actor ~0.4 ms
                # of CPU per token (7.9 ms per 16-token request against 1.8 ms for one token).
                ref = self.handles[w].generate.remote(*args)
                try:
                    out = await ref
                except asyncio.CancelledError:
                    _cancel_quietly(ref)  # the caller went away: the worker frees the request's blocks
                    raise
                if not out:
                    raise ray.exceptions.RayActorError()  # its stream ended without a result
                yield _last(self._finish(plan, attempt, req, Result.from_dict(out)))
        except ray.exceptions.RayActorError as e:
            log.warning("worker %s failed during a request: %s", w, type(e).__name__)
            self.router.mark_dead(w)
            if not attempt.streamed:
                attempt.died = type(e).__name__
                return
            error = f"worker {w} died after streaming {attempt.streamed} chunk(s); resend the request"
            failed = Result.failed(
                error, ErrorKind.UNAVAILABLE, id=req.id, worker_id=w, prompt_tokens=len(plan.token_ids)
            )
            yield _last(failed)
        except ray.exceptions.RayTaskError as e:
            self.router.counters.add(WORKER_ERRORS)
            yield _last(Result.failed(f"internal error on {w}: {e}", ErrorKind.INTERNAL, id=req.id, worker_id=w))
        finally:
            self.router.finished(plan, attempt.latency)

    @staticmethod
    async def _relay(gen):
        """The `Chunk`s of a worker's stream, ending with its result; a stream that ends without one
        is a dead worker. A caller that stops listening cancels the worker's stream."""
        ended = False
        try:
            async for ref in gen:
                chunk = Chunk.from_dict(await ref)
                if chunk.result is not None:
                    ended = True
                yield chunk
                if ended:
                    return
            ended = True
            raise ray.exceptions.RayActorError()  # the stream ended without a result
        except ray.exceptions.RayError:
            ended = True
            raise
        finally:
            if not ended:  # the caller went away mid-stream
                _cancel_quietly(gen)

    def _finish(self, plan: Plan, attempt: _Attempt, req: Request, out: Result) -> Result:
        """A worker's Result, counted and labelled with how it was placed."""
        attempt.latency = out.latency_s - out.queue_s  # its own queueing excluded
        if out.ok:
            self.router.account(plan, out.cached_tokens, req.cache_salt)
        extra = {**out.extra, "placement": plan.placement.reason, "attempts": attempt.number}
        return replace(out, extra=extra)

    def _admit(self, request: dict, tenant: str | None) -> Request | Result:
        """The request with the tenant's salt applied, or a failed Result saying what is wrong."""
        try:
            req = Request.from_dict(request)
        except (TypeError, ValueError) as e:
            rid = request.get("id") if isinstance(request, dict) else None
            return Result.failed(f"bad request: {e}", ErrorKind.BAD_REQUEST, id=rid)
        problem = self._tenant_problem(req, tenant)
        if problem:
            self.router.counters.add(REJECTED)
            return Result.failed(problem, ErrorKind.BAD_REQUEST, id=req.id)
        return self._salt_for_tenant(req, tenant) if tenant is not None else req

    def _tenant_problem(self, req: Request, tenant: str | None) -> str | None:
        if tenant is not None:
            if not isinstance(tenant, str) or not 0 < len(tenant) <= MAX_TENANT_CHARS:
                return f"tenant must be a non-empty string of at most {MAX_TENANT_CHARS} characters"
            if req.cache_salt is not None:
                return "pass either a tenant (the service derives the cache salt from it) or cache_salt, not both"
        elif self.spec.tenant_mode:
            return (
                "this service runs in tenant mode: every request needs a tenant id "
                "(Cluster.generate(..., tenant=...), prefixcache submit --tenant); a cache_salt in "
                "the request is not accepted"
            )
        return None

    def _salt_for_tenant(self, req: Request, tenant: str) -> Request:
        """The service sets the salt from the tenant id; a salt in the request body is not trusted."""
        digest = hmac.new(self._tenant_key, tenant.encode(), hashlib.sha256).hexdigest()[:32]
        return Request.from_dict({**req.to_dict(), "cache_salt": f"tenant:{digest}"})

    async def reset_prefix_cache(self) -> dict:
        """Empty the prefix cache of every live worker (for benchmarks that must start cold): each
        drops the blocks no request or pin holds, so requests in flight stay exact. Any replica can
        do it for the whole service, as each holds every worker. Returns {"workers": {id: blocks
        dropped}, "failed": {id: why}}."""
        await self._ready()

        async def one(w: str, h) -> tuple[str, int | None, str | None]:
            try:
                return w, await asyncio.wait_for(h.reset_prefix_cache.remote(), RESET_TIMEOUT_S), None
            except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
                return w, None, type(e).__name__

        live = [(w, h) for w, h in self.handles.items() if w in self.router.alive]
        outs = await asyncio.gather(*(one(w, h) for w, h in live))
        return {
            "workers": {w: n for w, n, err in outs if err is None},
            "failed": {w: err for w, _, err in outs if err is not None},
        }

    async def warm(self, requests: list[dict], tenant: str | None = None, everywhere: bool = False) -> list[dict]:
        """Pre-warm before traffic: compute and pin each request's prompt on the worker a request
        with that prompt would be placed on now (or on every live worker with `everywhere`), one
        prompt after another, so prompts sharing a prefix meet the worker that already holds it.
        Per request: {"workers": {worker: tokens pinned}} or {"error": why}. Not counted as traffic."""
        await self._ready()
        out = []
        for request in requests:
            req = self._admit(request, tenant)
            if isinstance(req, dict):  # a failed Result dict: what is wrong with the request
                out.append({"error": req["error"]})
                continue
            prepared = await asyncio.to_thread(self.router.prepare, req)
            if isinstance(prepared, Problem):
                out.append({"error": prepared.message})
                continue
            ids, chain = prepared
            try:
                out.append({"workers": await self._warm_one(ids, chain, req.cache_salt, everywhere)})
            except (NoWorker, ray.exceptions.RayError) as e:
                out.append({"error": f"not warmed: {type(e).__name__}: {e}"})
        return out

    async def _warm_one(self, ids: list[int], chain: list, salt: str | None, everywhere: bool) -> dict[str, int]:
        if everywhere:
            targets = [w for w in self.handles if w in self.router.alive]
            pinned = await asyncio.gather(*(self.handles[w].warm.remote([ids], salt) for w in targets))
            return {w: p[0] for w, p in zip(targets, pinned)}
        plan = await self._place(ids, chain, [])
        try:
            w = plan.placement.worker_id
            [pinned] = await self.handles[w].warm.remote([ids], salt)
            return {w: pinned}
        finally:
            self.router.finished(plan, None)

    # ---- introspection ---------------------------------------------------------------

    async def settings(self) -> dict:
        """The service's ServiceSpec as a dict; answers without starting (what `stop` needs)."""
        return self.spec.to_dict()

    async def config(self) -> dict:
        await self._ready()
        return {
            "service": self.spec.service,
            "spec": self.spec.to_dict(),
            "redis_url": self.redis_url,
            "workers": list(self.handles),
            "alive": sorted(self.router.alive),
            "policy": self.router.policy.name,
            "fingerprint": self.router.fingerprint,
            "block_size": self.router.block_size,
            "max_context": self.router.max_context,
        }

    async def local(self) -> dict:
        """This replica's own view: its counters and the requests it has in flight per worker."""
        await self._ready()
        return {
            "replica": self.replica,
            "router": self.router.counters.snapshot(),
            "inflight": dict(self.router.inflight),
        }

    async def _replicas(self) -> list[dict]:
        """Every replica's `local()`, this one first; a replica that does not answer says why."""

        async def ask(i: int) -> dict:
            try:
                peer = await asyncio.to_thread(find_router, self.spec.service, i)
                return await asyncio.wait_for(peer.local.remote(), HEALTH_TIMEOUT_S)
            except (ServiceError, ray.exceptions.RayError, asyncio.TimeoutError) as e:
                return {"replica": i, "error": type(e).__name__, "router": {}, "inflight": {}}

        others = [i for i in range(self.spec.routers) if i != self.replica]
        return [await self.local(), *await asyncio.gather(*(ask(i) for i in others))]

    async def stats(self) -> dict:
        """The service's stats; router counters and in-flight counts are summed over all replicas."""
        await self._ready()
        await asyncio.gather(*(self._quiet(h.flush.remote()) for h in self.handles.values()))
        per_worker = {}
        for w, h in self.handles.items():
            try:
                per_worker[w] = await asyncio.wait_for(h.stats.remote(), HEALTH_TIMEOUT_S)
            except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
                per_worker[w] = {"worker_id": w, "alive": False, "error": type(e).__name__}
        await asyncio.to_thread(self._flush_counters)
        try:
            counters = await asyncio.to_thread(self.index.counters, list(self.handles))
            source = "index"
        except IndexUnavailable:
            counters = {w: s.get("counters", {}) for w, s in per_worker.items()}
            source = "workers"
        replicas = await self._replicas()
        return {
            "service": self.spec.service,
            "policy": self.router.policy.name,
            "index_available": self.index.available,
            "counters_source": source,
            "router": _summed(r["router"] for r in replicas),
            "inflight": _summed(r["inflight"] for r in replicas),
            "routers": replicas,
            "workers": per_worker,
            **summarize(counters),
        }

    # ---- background ------------------------------------------------------------------

    async def _background(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.health_interval_s)
            beats += 1
            await self._check_health()
            if beats % 5 == 0:
                await self._refresh()
            await asyncio.to_thread(self._flush_counters)
            if beats % 3 == 0 and self.replica == 0:
                await asyncio.to_thread(self._record_history)

    async def _check_health(self) -> None:
        async def one(w, h):
            try:
                await asyncio.wait_for(h.health.remote(), HEALTH_TIMEOUT_S)
                self.router.mark_alive(w)
            except (ray.exceptions.RayError, asyncio.TimeoutError):
                self.router.mark_dead(w)

        await asyncio.gather(*(one(w, h) for w, h in self.handles.items()))

    async def _calibrate(self) -> None:
        """Each worker times a transfer from the next one (the real object-store path)."""
        ids = list(self.handles)
        if len(ids) < 2:
            return
        await asyncio.gather(
            *(self._quiet(self.handles[w].calibrate.remote(ids[(i + 1) % len(ids)])) for i, w in enumerate(ids))
        )

    async def _refresh(self) -> None:
        for w, h in self.handles.items():
            try:
                s = await asyncio.wait_for(h.stats.remote(), HEALTH_TIMEOUT_S)
            except (ray.exceptions.RayError, asyncio.TimeoutError):
                continue
            self.router.set_costs(w, CostModel.from_dict(s["costs"]))

    def _flush_counters(self) -> None:
        """Router counters and prefix hits to the index; kept for the next try if it is down."""
        deltas = self.router.counters.pending()
        hits = self.router.take_prefix_hits()
        try:
            self.index.add_counters(ROUTER, deltas)
            self.router.counters.mark_flushed(deltas)
            self.index.record_prefixes(hits)
        except IndexUnavailable:
            self.router.restore_prefix_hits(hits)

    def _record_history(self) -> None:
        try:
            record_history(self.index)
        except IndexUnavailable:
            return  # a gap in the chart, nothing else

    @staticmethod
    async def _quiet(ref) -> Any:
        try:
            return await asyncio.wait_for(ref, 30)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
            return e


@dataclass
class _Attempt:
    plan: Plan
    number: int  # 1 for the first worker tried
    died: str | None = None  # set when the worker died before streaming anything: retry elsewhere
    streamed: int = 0  # chunks passed on to the caller
    latency: float | None = None  # seconds the request occupied the worker (None: it failed)


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counts added key by key (zeros kept: a counter that exists reads 0, not missing)."""
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _cancel_quietly(ref) -> None:
    """Cancel a worker call or stream whose caller went away (the worker then frees the request's blocks)."""
    try:
        ray.cancel(ref)
    except Exception as e:  # already finished or the worker is gone: nothing left to free
        log.debug("cancel of a worker stream: %s", e)


RouterActor = ray.remote(RouterService)


def _last(result: Result) -> Chunk:
    """The chunk that ends a stream: it carries the request's result."""
    return Chunk("", (), result)
