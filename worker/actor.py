"""The Ray worker actor: a thin async shell around one Engine.

`WorkerService` is a plain class (tested without a cluster where possible);
`WorkerActor = ray.remote(WorkerService)` is the actor. The engine steps on
its own background thread (every running request shares each forward);
async methods submit on a side thread (tokenizing and a peer fetch may
block) and await the engine's output through the event loop, so `health`,
`stats` and `export_blocks` answer while requests run. Nothing here calls
`ray.get` inside `async def`: the only blocking Ray call, the peer fetch,
runs on a side thread.

A caller that goes away (a cancelled Ray task, a dropped stream) cancels its
request; the engine frees its blocks within one step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import torch

from cache_store import BlockHash, CacheConfig, Exported, MetadataIndex
from cache_store.counter_names import LeaseField
from worker.config import EngineConfig
from worker.engine import Engine, PeerFetchError, PeerHint
from worker.models import load_model, resolve_dtype
from worker.names import NAMESPACE, worker_actor_name
from worker.ray_metrics import RayMetrics
from worker.request import Chunk, ErrorKind, Request, Result
from worker.transfer import BadTransfer, pack_blocks, unpack_blocks

log = logging.getLogger(__name__)
COST_REFINES, COST_REFINE_EVERY_S = 3, 3.0  # idle re-timings of a prefill after start-up


class WorkerService:
    def __init__(
        self,
        worker_id: str,
        model: str,
        cache: dict[str, Any],
        *,
        redis_url: str | None,
        dtype: str | None = None,
        peer_timeout_s: float = 10.0,
        audit_fraction: float = 0.0,
        engine: dict[str, Any] | None = None,
    ):
        self.worker_id = worker_id
        self.config = CacheConfig(**cache)
        self.peer_timeout_s = peer_timeout_s
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        self.device = torch.device("cuda:0" if self.gpu_ids and torch.cuda.is_available() else "cpu")
        cpus = _assigned_cpus()
        self._peers: dict[str, ray.actor.ActorHandle] = {}
        self._inflight = 0
        self._served = 0
        self._submit_thread = ThreadPoolExecutor(4, thread_name_prefix=f"submit-{worker_id}")
        self._side_thread = ThreadPoolExecutor(2, thread_name_prefix=f"export-{worker_id}")

        def build() -> Engine:  # on the engine's own thread: all torch work stays on one thread
            if self.device.type == "cpu" and cpus:
                torch.set_num_threads(cpus)
            return Engine(
                load_model(model, self.device, resolve_dtype(dtype, self.device)),
                self.config,
                device=self.device,
                worker_id=worker_id,
                index=MetadataIndex(redis_url, self.config) if redis_url else None,
                peer_fetcher=self._fetch,
                audit_fraction=audit_fraction,
                engine_config=EngineConfig(**(engine or {})),
            )

        self.engine = Engine.on_own_thread(build, name=f"engine-{worker_id}")
        self.metrics = RayMetrics(self.config.service, worker_id)
        if self.engine.keeper is not None:
            self.engine.keeper.gauges = self._gauges
        threading.Thread(target=self._refine_costs, name=f"costs-{worker_id}", daemon=True).start()

    # ---- requests ---------------------------------------------------------------

    async def generate(
        self, request: dict, token_ids: list[int] | None = None, hint: tuple[str, int] | None = None
    ) -> dict:
        """Serve one request (a Request dict); returns a Result dict. Never raises for bad input."""
        result: dict = {}
        async for chunk in self._serve(request, token_ids, hint):
            if chunk.result is not None:
                result = chunk.result.to_dict()
        return result

    async def stream(self, request: dict, token_ids: list[int] | None = None, hint: tuple[str, int] | None = None):
        """Serve one request, yielding `Chunk.to_dict()`s as tokens are generated; the last carries the
        Result. Call with `.options(num_returns="streaming")`."""
        async for chunk in self._serve(request, token_ids, hint):
            yield chunk.to_dict()

    async def _serve(self, request: dict, token_ids: list[int] | None, hint: tuple[str, int] | None):
        arrived = time.perf_counter()
        self._inflight += 1
        seq = None
        try:
            try:
                req = Request.from_dict(request)
            except (TypeError, ValueError) as e:
                yield Chunk("", (), Result.failed(f"bad request: {e}", ErrorKind.BAD_REQUEST, worker_id=self.worker_id))
                return
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Chunk] = asyncio.Queue()
            peer = PeerHint(hint[0], int(hint[1])) if hint else None

            def sink(chunk: Chunk) -> None:  # on the engine's thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                except RuntimeError:
                    pass  # the event loop is gone (actor exiting): nobody is waiting for it

            def submit():
                return self.engine.submit(req, token_ids=token_ids, hint=peer, arrived=arrived, sink=sink)

            seq = await loop.run_in_executor(self._submit_thread, submit)
            if isinstance(seq, Result):
                yield Chunk("", (), seq)
                return
            while True:
                for chunk in ready_chunks(await queue.get(), queue):
                    if chunk.result is not None:
                        self.metrics.observe(chunk.result)
                    yield chunk
                    if chunk.result is not None:
                        return
        finally:
            if seq is not None and not isinstance(seq, Result) and not seq.done.is_set():
                self.engine.cancel(seq)  # the caller went away: free its blocks
            self._inflight -= 1
            self._served += 1

    async def export_blocks(self, hashes: list[bytes]) -> tuple[bytes, np.ndarray]:
        """KV of the leading run of `hashes` held here, packed for the object store."""
        loop = asyncio.get_running_loop()
        ex = await loop.run_in_executor(self._side_thread, self.engine.export_blocks, [BlockHash(h) for h in hashes])
        return pack_blocks(ex)

    async def echo_blocks(self, n: int) -> tuple[bytes, np.ndarray]:
        """n blocks of zeros in the export format: lets a peer time the transfer path."""
        shape = self.engine.store.shape
        ex = Exported(
            [BlockHash(bytes(16))] * n,
            [(0,) * shape.block_size] * n,
            torch.zeros((n, *shape.block_dims), dtype=shape.dtype),
        )
        return pack_blocks(ex)

    async def calibrate(self, peer_id: str, rounds: int = 3) -> dict[str, float]:
        """Time fetching 1 and 32 blocks from `peer_id` and set the cost model's transfer terms."""
        handle = self._peer(peer_id)
        timings = {}
        for n in (1, 32):
            best = float("inf")
            for _ in range(rounds):
                t = time.perf_counter()
                meta, data = await handle.echo_blocks.remote(n)
                unpack_blocks(meta, data)
                best = min(best, time.perf_counter() - t)
            timings[n] = best
        per_block = max(0.0, (timings[32] - timings[1]) / 31)
        overhead = max(0.0, timings[1] - per_block)
        costs = self.engine.update_costs(transfer_s_per_block=per_block, transfer_overhead_s=overhead)
        return costs.to_dict(self.engine.block_size)

    # ---- introspection ------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        keeper = self.engine.keeper
        return {
            "worker_id": self.worker_id,
            "alive": True,
            "queue": self._inflight,
            "served": self._served,
            "device": str(self.device),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            "pid": os.getpid(),
            "index_connected": bool(keeper and keeper.connected),
            "generation": keeper.generation if keeper else None,
        }

    async def info(self) -> dict[str, Any]:
        return self.engine.info()

    async def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), **await self.health()}

    async def pin_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._side_thread, self.engine.pin_prefix, token_ids, cache_salt)

    async def warm(self, prompts: list, cache_salt: str | None = None) -> list[int]:
        """Pre-warm (`Engine.warm`): compute and pin each prompt's prefix; tokens pinned per prompt."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._side_thread, self.engine.warm, prompts, cache_salt)

    async def reset_prefix_cache(self) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._side_thread, self.engine.reset_prefix_cache)

    async def flush(self) -> bool:
        """Heartbeat now (publishes counters); True if the index took it."""
        if self.engine.keeper is None:
            return False
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._side_thread, self.engine.keeper.beat)
        return self.engine.keeper.connected

    async def shutdown(self) -> None:
        """Graceful stop: deregister from the index (entries removed) and free the engine."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._side_thread, self.engine.close)

    # ---- internals ----------------------------------------------------------------

    def _refine_costs(self) -> None:
        """Re-time a prefill at a few idle moments after start-up (`Engine.refine_prefill_cost`); the
        router reads the result with the worker's stats."""
        for _ in range(COST_REFINES):
            time.sleep(COST_REFINE_EVERY_S)
            if self._inflight:
                continue  # busy: timing now would only measure the queue
            try:
                self.engine.refine_prefill_cost()
            except (ValueError, RuntimeError) as e:  # no room for the prompt now, or the engine closed
                log.debug("prefill cost not refined: %s", e)

    def _gauges(self) -> dict[str, Any]:
        g = self.engine.gauges()
        self.metrics.gauges(g, self._inflight)
        return {**g, LeaseField.QUEUE: self._inflight, LeaseField.SERVED: self._served}

    def _peer(self, peer_id: str):
        if peer_id not in self._peers:
            self._peers[peer_id] = ray.get_actor(worker_actor_name(self.config.service, peer_id), namespace=NAMESPACE)
        return self._peers[peer_id]

    def _fetch(self, peer_id: str, hashes: list[BlockHash]) -> Exported:
        """Runs on a submit thread (never on the event loop or the engine's step loop)."""
        try:
            ref = self._peer(peer_id).export_blocks.remote([bytes(h) for h in hashes])
            meta, data = ray.get(ref, timeout=self.peer_timeout_s)
            return unpack_blocks(meta, data)
        except (ray.exceptions.RayError, ValueError, BadTransfer) as e:
            self._peers.pop(peer_id, None)
            raise PeerFetchError(f"{type(e).__name__}: {e}") from None


def ready_chunks(first: Chunk, queue: asyncio.Queue) -> list[Chunk]:
    """`first` and every chunk already waiting behind it, text chunks merged into one: when this
    loop falls behind the engine (many streams on one worker), each message carries several tokens
    instead of one, and every hop after it (the router, the client) handles fewer messages."""
    got = [first]
    while got[-1].result is None and not queue.empty():
        got.append(queue.get_nowait())
    text = [c for c in got if c.result is None]
    merged = [Chunk("".join(c.text for c in text), tuple(t for c in text for t in c.token_ids))] if text else []
    return merged + [c for c in got if c.result is not None]


def _assigned_cpus() -> int:
    if not ray.is_initialized():
        return 0
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, int(cpus)) if cpus else 0


WorkerActor = ray.remote(WorkerService)
