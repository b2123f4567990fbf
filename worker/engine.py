"""Engine: a transformers causal LM serving many requests per forward over a paged KV cache.

The device tier of the cache IS the engine's KV memory. A request is
admitted with its block table pointing at the cached blocks of its longest
cached prefix (in place, pinned) and at fresh pool blocks for the rest; each
step runs ONE forward over every running request (`worker.scheduler`,
`worker.model_runner`, `worker.paged_attention`); every block is cached the
moment it is full. So only the uncached part of a prompt is ever prefilled,
and concurrent requests and the next chat turn hit what is being computed.

Threads: `submit` may be called from any thread (it tokenizes, validates and
pulls a peer's blocks in the caller's thread). Steps run under one lock,
either on a background loop (`start`, what the Ray actor uses) or driven by
whichever caller waits (`generate`, `stream`, `run` without a loop).
`stats` and `export_blocks` never wait for a step.

Exactness: each request's attention reads only its own tokens, through the
same kernels as an unbatched run; the linear layers see a different number
of rows, which moves float32 logits by ~1e-6 (see README, "Exactness").
`max_running=1` gives batch-independent bits.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from cache_store import (
    DEVICE_CACHE_GB,
    DISK_CACHE_GB,
    HOST_CACHE_GB,
    CacheConfig,
    ConfigError,
    Counters,
    Exported,
    IndexUnavailable,
    KVShape,
    LeaseKeeper,
    MetadataIndex,
    TieredStore,
    block_chain,
    root_hash,
    time_promotion,
    token_blocks,
)
from cache_store.counter_names import (
    AUDIT_CHECKED,
    AUDIT_MISMATCHES,
    CANCELLED_REQUESTS,
    FAILED_REQUESTS,
    PREEMPTIONS,
    REJECTED_REQUESTS,
    LeaseField,
    disk_summary,
    worker_request_counts,
)
from cache_store.hashing import BlockHash
from cache_store.tree import DEVICE, DISK, HOST
from worker.block_manager import BlockManager
from worker.config import EngineConfig
from worker.costs import CostModel
from worker.cuda_graphs import decode_graphs
from worker.lean import FAMILIES as LEAN_FAMILIES
from worker.lean import LeanLlama
from worker.linear import prepare_linears
from worker.model_runner import ModelRunner
from worker.models import (
    LoadedModel,
    fingerprint,
    load_model,
    resolve_device,
    resolve_dtype,
)
from worker.output import Detokenizer, build_result, cut_at_stop
from worker.paged_attention import ATTN_NAME, resolve_backend
from worker.peer import PeerFetcher, PeerFetchError, PeerHint, fetch_prefix
from worker.request import ErrorKind, Problem, Request, Result, prompt_ids_problem, stop_tuple
from worker.sampling import GREEDY_BELOW, make_generator, next_token
from worker.scheduler import Scheduler
from worker.sequence import Chunk, Status
from worker.sequence import Sequence as Seq  # collections.abc.Sequence keeps its own name here

__all__ = ["Engine", "EngineConfig", "PeerFetchError", "PeerHint", "Chunk"]

log = logging.getLogger(__name__)
# Largest last-position logit difference the audit accepts between cached and fresh prefill:
# float noise of the two computation orders, far below what a wrong block produces.
AUDIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig,
        *,
        device: torch.device,
        engine_config: EngineConfig | None = None,
        worker_id: str = "local",
        index: MetadataIndex | None = None,
        model_fingerprint: str | None = None,
        peer_fetcher: PeerFetcher | None = None,
        audit_fraction: float = 0.0,
        audit_seed: int | None = None,
    ):
        if not 0.0 <= audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction must be in [0, 1], got {audit_fraction!r}")
        self.config = (engine_config or EngineConfig()).resolved(device)
        self.audit_fraction = audit_fraction
        self._audit_rng = random.Random(audit_seed)
        self.loaded = loaded
        self.model = loaded.model
        self.model.set_attn_implementation(ATTN_NAME)
        self.tokenizer = loaded.tokenizer
        self.device = device
        self.worker_id = worker_id
        self.block_size = cache_config.block_size
        self.dtype = next(self.model.parameters()).dtype
        self.linear = prepare_linears(self.model, self.config.linear, device, self.dtype)
        self.fingerprint = model_fingerprint or fingerprint(self.model, self.tokenizer, self.block_size)
        lay = loaded.layout
        shape = KVShape(lay.layers, lay.kv_heads, cache_config.block_size, lay.head_dim, self.dtype)
        self.store = TieredStore(cache_config, shape, device, fingerprint=self.fingerprint)
        self.counters = Counters()  # requests, peer fetches, audits; the store counts its blocks itself
        self.peer_fetcher = peer_fetcher
        rows = self.config.max_running
        self.blocks = BlockManager(self.store, self.block_size, rows)
        self.scheduler = Scheduler(
            self.blocks, max_running=self.config.max_running, max_batch_tokens=self.config.max_batch_tokens
        )
        self.attention = resolve_backend(self.config.attention, device)
        max_blocks = min(self.store.device_pool.capacity, -(-loaded.max_context // self.block_size) + 1)
        self.runner = ModelRunner(
            self.model,
            self.store.device_pool.data,
            self.block_size,
            device,
            self.attention,
            rows=rows,
            max_blocks=max_blocks,
            lean=self._lean(),
        )
        self.cuda_graphs = "off: cuda_graphs='off'"  # what info() reports
        if self.config.cuda_graphs != "off":
            self.runner.graphs, self.cuda_graphs = decode_graphs(
                self.model, self.store, self.runner.tables, self.attention, self.config.max_running
            )
        self.detok = Detokenizer(self.tokenizer)
        # end-of-sequence ids, masked while a request is below its min_tokens
        self._eos_list = torch.tensor(sorted(loaded.eos_ids), dtype=torch.long, device=device)
        self._step_lock = threading.RLock()
        self._inbox: collections.deque[Seq] = collections.deque()
        self._wake = threading.Event()
        self._loop: threading.Thread | None = None
        self._stopping = False
        self._audits = 0  # audit recomputations queued, not finished
        self._costs_lock = threading.Lock()  # `costs` is replaced whole, by one writer at a time
        self.costs = CostModel(
            prefill_s_per_token=self._measure_prefill(),
            promote_s_per_block=time_promotion(shape, device),
            max_running=self.config.max_running,
            **self.store.time_disk_read(),  # disk tier: read cost terms ({} without one)
        )
        self.store.set_read_policy(self._disk_read_pays)
        self.index = index
        self.keeper: LeaseKeeper | None = None
        if index is not None:
            self.keeper = LeaseKeeper(
                index, self.store, worker_id, info=self.info(), gauges=self.gauges, counters=self.counters
            )
            self.keeper.start()
            for last in self.store.pinned_prefixes():  # pins the disk tier brought back
                self._mark_pinned(last, True)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "demo",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        block_size: int = CacheConfig.block_size,
        device_cache_gb: float = DEVICE_CACHE_GB,
        host_cache_gb: float = HOST_CACHE_GB,
        eviction: str = CacheConfig.eviction,
        redis_url: str | None = None,
        service: str = CacheConfig.service,
        worker_id: str | None = None,
        cache_config: CacheConfig | None = None,
        peer_fetcher: PeerFetcher | None = None,
        audit_fraction: float = 0.0,
        max_running: int | None = None,
        max_batch_tokens: int | None = None,
        attention: str = EngineConfig.attention,
        linear: str = EngineConfig.linear,
        forward: str = EngineConfig.forward,
        cuda_graphs: str = EngineConfig.cuda_graphs,
        disk_cache_dir: str | None = None,
        disk_cache_gb: float = DISK_CACHE_GB,
    ) -> Engine:
        """Load 'demo' or a local Hugging Face causal-LM directory with a fresh cache.

        With `redis_url`, the engine takes a lease in that index and publishes its blocks.
        `audit_fraction` of cache hits are re-computed without the cache and compared
        (counters `audit_checked` / `audit_mismatches`; expected 0 mismatches).
        `max_running` / `max_batch_tokens`: batching limits (device defaults when None).
        `attention`: "auto" (the fastest built for the device), "cpu_kernel" or "sdpa" (see
        worker.paged_attention).
        `linear`: "auto" (our GEMM's packed weights on CPU), "kernel", "packed" (oneDNN) or "plain"
        (see worker.linear).
        `forward`: "auto" (the lean Llama forward where it applies), "lean" or "transformers" (see
        worker.lean).
        `cuda_graphs`: "auto" (decode steps replay CUDA graphs where they apply) or "off" (see
        worker.cuda_graphs).
        `disk_cache_dir`: a disk tier of `disk_cache_gb` in that directory (this engine's alone); an
        engine started again on it serves what it finds there (same model only).
        """
        config = cache_config or CacheConfig.from_gb(
            device_cache_gb,
            host_cache_gb,
            disk_cache_gb,
            block_size=block_size,
            eviction=eviction,
            service=service,
            disk_dir=None if disk_cache_dir is None else str(disk_cache_dir),
        )
        dev = resolve_device(device)
        engine_config = EngineConfig(max_running, max_batch_tokens, attention, linear, forward, cuda_graphs)
        engine_config.check()
        loaded = load_model(model, dev, resolve_dtype(dtype, dev))
        index = MetadataIndex(redis_url, config) if redis_url else None
        wid = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        return cls(
            loaded,
            config,
            device=dev,
            engine_config=engine_config,
            worker_id=wid,
            index=index,
            peer_fetcher=peer_fetcher,
            audit_fraction=audit_fraction,
        )

    # ---- public API -----------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]] | str,
        max_new_tokens: int = Request.max_new_tokens,
        temperature: float = Request.temperature,
        top_p: float = Request.top_p,
        top_k: int = Request.top_k,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        cache_salt: str | None = None,
        ignore_eos: bool = Request.ignore_eos,
        min_tokens: int = Request.min_tokens,
    ) -> list[Result]:
        """One Result per prompt, in order; all prompts run concurrently. A bad prompt gets a Result
        with `error`; the rest still run."""
        if isinstance(prompts, str):
            prompts = [prompts]
        stops = stop_tuple(stop)
        reqs = [
            Request(
                p,
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stops,
                cache_salt,
                ignore_eos=ignore_eos,
                min_tokens=min_tokens,
            )
            for p in prompts
        ]
        seqs = [self.submit(r) for r in reqs]
        return [s if isinstance(s, Result) else self.wait(s) for s in seqs]

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = Request.max_new_tokens,
        temperature: float = Request.temperature,
        top_p: float = Request.top_p,
        top_k: int = Request.top_k,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        cache_salt: str | None = None,
        ignore_eos: bool = Request.ignore_eos,
        min_tokens: int = Request.min_tokens,
    ) -> Iterator[Chunk]:
        """Chunks of text (and their token ids) as they are generated; the last carries the Result.
        Stopping the iteration cancels the request and frees its blocks."""
        req = Request(
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop_tuple(stop),
            cache_salt,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
        )
        return self.stream_request(req)

    def stream_request(self, req: Request, **submit_kw) -> Iterator[Chunk]:
        pending: collections.deque[Chunk] = collections.deque()
        seq = self.submit(req, sink=pending.append, **submit_kw)
        if isinstance(seq, Result):
            yield Chunk("", (), seq)
            return
        try:
            while True:
                while pending:
                    chunk = pending.popleft()
                    yield chunk
                    if chunk.result is not None:
                        return
                self._advance(seq)
        finally:
            if not seq.done.is_set():
                self.cancel(seq)

    def run(
        self,
        req: Request,
        *,
        token_ids: Sequence[int] | None = None,
        hint: PeerHint | None = None,
        arrived: float | None = None,
    ) -> Result:
        """Serve one request to completion (other requests may share its steps)."""
        seq = self.submit(req, token_ids=token_ids, hint=hint, arrived=arrived)
        return seq if isinstance(seq, Result) else self.wait(seq)

    def submit(
        self,
        req: Request,
        *,
        token_ids: Sequence[int] | None = None,
        hint: PeerHint | None = None,
        arrived: float | None = None,
        sink=None,
        use_cache: bool = True,
        write_cache: bool = True,
        capture_logits: bool = False,
    ) -> Seq | Result:
        """Queue a request; returns its Sequence, or a failed Result for a bad request.

        `token_ids` (from the router) skips tokenization; `arrived` is when the worker received it
        (perf_counter). `sink` is called with each Chunk from the stepping thread. A peer fetch the
        router suggested in `hint` happens here, in the caller's thread, not in the step loop."""
        t0 = arrived if arrived is not None else time.perf_counter()
        message = req.problem()
        ids: list[int] = []
        problem = None if message is None else Problem(ErrorKind.BAD_REQUEST, message)
        if problem is None:
            ids, problem = self._prompt_ids(req, token_ids)
        if problem is not None:
            self.counters.add(REJECTED_REQUESTS)
            return Result.refused(problem, id=req.id, worker_id=self.worker_id, prompt_tokens=len(ids))
        audit = use_cache and write_cache and self.audit_fraction > 0 and self._audit_rng.random() < self.audit_fraction
        root = root_hash(self.fingerprint, req.cache_salt)
        seq = Seq(
            req,
            ids,
            root,
            make_generator(req.seed),
            t0,
            sink=sink,
            use_cache=use_cache,
            write_cache=write_cache,
            capture_logits=capture_logits or audit,
            audit=audit,
            chain=block_chain(root, ids, self.block_size),  # the only time a prompt is hashed here
            chain_blocks=token_blocks(ids, self.block_size),
        )
        if hint is not None and use_cache and self.peer_fetcher is not None:
            self._fetch_for(seq, hint)
        if use_cache and self.store.disk is not None:
            self._prefetch_from_disk(seq)  # disk tier: read here, not in the step loop
        self._inbox.append(seq)
        self._wake.set()
        return seq

    def wait(self, seq: Seq) -> Result:
        while not seq.done.is_set():
            self._advance(seq)
        while self._loop is None and self._audits and self._step():
            pass  # without a loop, the caller also runs the audits its request queued
        assert seq.result is not None
        return seq.result

    def cancel(self, seq: Seq) -> None:
        """Stop a request (a client went away): its blocks are freed within one step."""
        seq.cancelled = True
        self._wake.set()
        if self._loop is None:
            with self._step_lock:
                self._reap()

    def start(self) -> None:
        """Run steps on a background thread from now on (callers then only wait). Prefer
        `Engine.on_own_thread`: torch's CPU thread pool runs at full speed only on the thread that
        first used it (measured on 2 cores: a forward 30% slower on a second thread)."""
        if self._loop is None:
            self._stopping = False
            self._loop = threading.Thread(target=self._serve, name=f"engine-{self.worker_id}", daemon=True)
            self._loop.start()

    @staticmethod
    def on_own_thread(build: Callable[[], Engine], name: str = "engine") -> Engine:
        """Build an engine on a new thread and run its step loop there, so loading, measuring and
        every forward happen on one thread (what the Ray actor does). Raises what `build` raised."""
        ready: queue.Queue = queue.Queue()

        def main() -> None:
            try:
                engine = build()
            except BaseException as e:
                ready.put(e)
                return
            engine._loop = threading.current_thread()
            ready.put(engine)
            engine._serve()

        threading.Thread(target=main, name=name, daemon=True).start()
        out = ready.get()
        if isinstance(out, BaseException):
            raise out
        return out

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def chain(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[BlockHash]:
        return block_chain(root_hash(self.fingerprint, cache_salt), token_ids, self.block_size)

    def prefill_logits(self, token_ids: Sequence[int], cache_salt: str | None = None, *, use_cache: bool = True):
        """(logits, cached tokens per source) of the last prompt position, through the same path as
        every request, storing nothing. Logits are float32 on CPU. Used by the exactness tests."""
        req = Request(list(token_ids), max_new_tokens=1, cache_salt=cache_salt)
        seq = self.submit(req, use_cache=use_cache, write_cache=False, capture_logits=True)
        if isinstance(seq, Result):
            raise ValueError(seq.error)
        self.wait(seq)
        return seq.prompt_logits.float().cpu(), dict(seq.by_tier)

    def export_blocks(self, hashes: Sequence[BlockHash]) -> Exported:
        """KV of the leading run of `hashes` held here (for a peer)."""
        return self.store.export(list(hashes))

    def reset_prefix_cache(self) -> int:
        """Forget every cached block no request or pin holds (benchmarks that must start cold);
        returns blocks dropped. Requests in flight keep their blocks and stay exact."""
        return self.store.clear()

    def pin_prefix(self, prompt: str | Sequence[int], cache_salt: str | None = None) -> int:
        """Keep a cached prompt prefix (e.g. a system prompt) from ever being evicted. Returns tokens pinned."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        chain = self.chain(ids, cache_salt)
        n = self.store.pin_prefix(chain, token_blocks(ids, self.block_size))
        if n:
            self._mark_pinned(chain[n - 1], True)
        return n * self.block_size

    def unpin_prefix(self, prompt: str | Sequence[int], cache_salt: str | None = None) -> bool:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        last = self.store.unpin_prefix(self.chain(ids, cache_salt))
        if last is not None:
            self._mark_pinned(last, False)
        return last is not None

    def warm(self, prompts: Sequence[str | Sequence[int]], cache_salt: str | None = None) -> list[int]:
        """Pre-warm: compute each prompt's KV (a prefill, no token generated) and pin its cached
        prefix, so traffic that arrives later hits it; with a disk tier the pinned blocks are
        written to disk first, so they survive a restart. Returns tokens pinned per prompt (0 for
        a prompt that failed: too long, out of vocabulary, ...)."""
        out = []
        for prompt in prompts:
            ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            done = self.run(Request(ids, max_new_tokens=0, cache_salt=cache_salt))
            out.append(self.pin_prefix(ids, cache_salt) if done.ok else 0)
        return out

    def _mark_pinned(self, last: BlockHash, pinned: bool) -> None:
        """Tell the index (for the dashboard); the pin itself is local and holds without it."""
        if self.index is None:
            return
        try:
            self.index.set_pinned([last], pinned)
        except IndexUnavailable as e:
            log.warning("pin not shown on the dashboard: %s", e)

    def info(self) -> dict[str, object]:
        return {
            "worker_id": self.worker_id,
            "model": self.loaded.name,
            "fingerprint": self.fingerprint,
            "block_size": self.block_size,
            LeaseField.DEVICE: str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            LeaseField.BLOCK_BYTES: self.store.shape.block_bytes,
            "max_context": self.loaded.max_context,
            "vocab_size": self.loaded.vocab_size,
            "max_running": self.config.max_running,
            "max_batch_tokens": self.config.max_batch_tokens,
            "attention": self.attention,
            "linear": self.linear,
            "forward": "lean" if self.runner.lean is not None else "transformers",
            "cuda_graphs": self.cuda_graphs,
            LeaseField.PREFILL_US_PER_TOKEN: round(self.costs.prefill_s_per_token * 1e6, 3),
            "disk_dir": self.store.config.disk_dir or "",
        }

    def gauges(self) -> dict[str, object]:
        s = self.store.stats()
        return {
            LeaseField.blocks(DEVICE): s.device.blocks,
            LeaseField.capacity(DEVICE): s.device.capacity,
            "working_blocks": self.store.working_blocks,
            LeaseField.blocks(HOST): s.host.blocks,
            LeaseField.capacity(HOST): s.host.capacity,
            LeaseField.blocks(DISK): s.disk.blocks,
            LeaseField.capacity(DISK): s.disk.capacity,
            LeaseField.DISK_BYTES: s.disk.bytes_used,
            LeaseField.DISK_CAPACITY_BYTES: s.disk.bytes_capacity,
            "pinned_blocks": s.device.pinned + s.host.pinned,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
        }

    def stats(self) -> dict[str, object]:
        s = self.store.stats()
        return {
            **self.info(),
            "device_tier": s.device._asdict(),
            "host_tier": s.host._asdict(),
            "disk_tier": s.disk._asdict(),
            "disk": disk_summary(s.counters, s.disk.bytes_used, s.disk.bytes_capacity),
            "counters": {**s.counters, **self.counters.snapshot()},
            "costs": self.costs.to_dict(self.block_size),
            "index_connected": bool(self.keeper and self.keeper.connected),
        }

    def close(self) -> None:
        """Stop the loop; requests still queued or running fail with a clear error (none hangs)."""
        if self._loop is not None:
            self._stopping = True
            self._wake.set()
            self._loop.join(timeout=30)
            self._loop = None
        with self._step_lock:
            self._fail_all("the worker is shutting down; resend the request", ErrorKind.SHUTTING_DOWN)
        if self.keeper is not None:
            self.keeper.stop()
        if self.index is not None:
            self.index.close()
        self.store.close()  # disk tier: writes what is queued, releases its directory

    def _lean(self) -> LeanLlama | None:
        """The lean forward (worker.lean) where the settings allow it and it applies; "lean" asked
        for where it does not is an error that says why."""
        if self.config.forward == "transformers":
            return None
        lean = LeanLlama.build(self.model, device=self.device, backend=self.attention, linear=self.linear)
        if lean is None and self.config.forward == "lean":
            raise ConfigError(
                f"forward='lean' needs a {'/'.join(LEAN_FAMILIES)} model in float32 on CPU with attention "
                f"'cpu_kernel' and linear 'kernel' or 'packed' (here: {type(self.model).__name__}, {self.dtype}, {self.device}, attention "
                f"{self.attention!r}, linear {self.linear!r}); use 'auto' or 'transformers'"
            )
        return lean

    # ---- stepping ----------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                while not self._stopping and self._step():
                    pass
            except Exception as e:  # a bug: fail what was in flight, keep the loop (and the worker) alive
                log.exception("engine step failed")
                with self._step_lock:
                    self._fail_all(f"internal error in the engine: {type(e).__name__}: {e}", ErrorKind.INTERNAL)

    def _fail_all(self, error: str, kind: ErrorKind) -> None:
        """(Step lock held.) Fail every request the engine holds."""
        self._reap()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self._fail(seq, error, kind)

    def _advance(self, seq: Seq) -> None:
        """Make progress towards seq's completion: step here, or wait for the loop to."""
        if self._loop is not None:
            seq.progress.wait(timeout=0.5)
            seq.progress.clear()
            return
        if not self._step() and not seq.done.is_set():
            raise RuntimeError("engine made no progress with a request pending (scheduler bug)")

    def _step(self) -> bool:
        """One forward over the scheduled batch; False if there was nothing to do."""
        with self._step_lock:
            self._reap()
            step = self.scheduler.schedule()
            if step.preempted:
                self.counters.add(PREEMPTIONS, len(step.preempted))
            if not step.batch:
                return bool(step.preempted) or self._unblock()
            try:
                logits, sampled = self.runner.run(step.batch)
            except Exception as e:  # a bug or a device error: find whose it is, keep serving the rest
                log.exception("forward failed")
                batch, logits, sampled = self._forward_alone(step.batch, e)
            else:
                batch = step.batch
            for seq, n in batch:
                self.blocks.commit(seq, n)
                self.scheduler.committed(seq)
            greedy = logits.argmax(dim=-1).tolist() if sampled else []  # one call for the whole batch
            for seq, row, top in zip(sampled, logits, greedy):
                self._sample(seq, row, top)
            return True

    def _forward_alone(self, batch, error: Exception):
        """A batch's forward failed: run each request's part on its own and fail only those whose
        own forward fails too (with a server error: every request passed its checks). Repeating is
        safe: a forward writes KV only into the slots of the tokens it feeds, which nothing has read
        yet. Returns the parts that ran, their logits rows and the requests those rows sample."""
        if len(batch) == 1:
            self._fail(batch[0][0], _forward_failed(error), ErrorKind.INTERNAL)
            return [], None, []
        ran, rows, sampled = [], [], []
        for seq, n in batch:
            try:
                logits, got = self.runner.run([(seq, n)])
            except Exception as e:
                self._fail(seq, _forward_failed(e), ErrorKind.INTERNAL)
                continue
            ran.append((seq, n))
            rows.append(logits)
            sampled += got
        return ran, torch.cat(rows) if rows else None, sampled

    def _reap(self) -> None:
        """Move new requests in; drop cancelled ones (blocks freed)."""
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self.scheduler.finish(seq)
            self._finish(seq, "cancelled", released=True)
        for seq in [s for s in self.scheduler.waiting if s.cancelled]:
            self.scheduler.drop_waiting(seq)
            self._finish(seq, "cancelled", released=True)

    def _unblock(self) -> bool:
        """Nothing could be scheduled. If requests wait while none runs, what fills the device pool
        may be blocks that waiting requests fetched from peers (pinned until their admission): let
        them go, they stay cached. Otherwise the first request cannot fit the device pool at all:
        fail it with what to change rather than wait forever."""
        if not self.scheduler.waiting or self.scheduler.running:
            return False
        if any([self.blocks.drop_peer_hold(seq) for seq in self.scheduler.waiting]):
            return True
        seq = self.scheduler.waiting[0]
        need = self.blocks.blocks_needed(seq, seq.to_feed) + 1
        self._fail(
            seq,
            f"this request needs {need} KV blocks of {self.block_size} tokens at once and the device cache "
            f"can free only {self.store.room()}; shorten the prompt or raise --device-cache-gb",
            ErrorKind.CONTEXT_EXCEEDED,
        )
        return True

    def _sample(self, seq: Seq, logits: torch.Tensor, top: int) -> None:
        """Choose seq's next token and emit what it adds. A failure here (its sampling, its stop
        strings, its detokenizing, its sink) is this request's alone: it fails, the batch goes on."""
        try:
            self._sample_one(seq, logits, top)
        except Exception as e:
            log.exception("request %s failed after its forward", seq.req.id)
            if not seq.done.is_set():
                self._fail(seq, f"internal error in the engine: {type(e).__name__}: {e}", ErrorKind.INTERNAL)

    def _sample_one(self, seq: Seq, logits: torch.Tensor, top: int) -> None:
        """`top`: the row's argmax, the token of a greedy request (found for the batch at once)."""
        if seq.capture_logits and seq.prompt_logits is None:
            seq.prompt_logits = logits.detach().float().cpu()
        req = seq.req
        if req.max_new_tokens == 0:
            return self._end(seq, "length")
        early = len(seq.out) < req.min_tokens
        if req.temperature < GREEDY_BELOW and (not early or top not in self.loaded.eos_ids):
            tok = top  # masking end-of-sequence ids cannot move an argmax that is none of them
        else:
            if early and len(self._eos_list):
                logits = logits.index_fill(0, self._eos_list, float("-inf"))
            tok = next_token(logits, req.temperature, req.top_k, req.top_p, seq.generator)
        seq.out.append(tok)
        seq.mark_first_token()
        if tok in self.loaded.eos_ids and not req.ignore_eos and not early:
            return self._end(seq, "eos")
        if req.stop and not early and self.detok.stop_hit(seq):
            return self._end(seq, "stop")
        if len(seq.out) >= req.max_new_tokens:
            return self._end(seq, "length")
        if seq.sink is not None:
            chunk = self.detok.piece(seq, final=False)
            if chunk is not None:
                seq.emit(chunk)

    def _end(self, seq: Seq, reason: str) -> None:
        self.scheduler.finish(seq)
        self._finish(seq, reason, released=True)

    def _fail(self, seq: Seq, error: str, kind: ErrorKind) -> None:
        if seq.status is Status.RUNNING:
            self.scheduler.finish(seq)
        else:
            self.scheduler.drop_waiting(seq)
        seq.result = Result.failed(error, kind, id=seq.req.id, worker_id=self.worker_id, prompt_tokens=len(seq.prompt))
        self.counters.add(FAILED_REQUESTS)
        seq.emit(Chunk("", (), seq.result))
        seq.done.set()

    def _finish(self, seq: Seq, reason: str, *, released: bool) -> None:
        seq.finish_reason = reason
        if seq.sink is not None and reason != "cancelled":
            last = self.detok.piece(seq, final=True)
            if last is not None:
                seq.emit(last)
        text = self.detok.text(seq)
        if reason == "stop":
            text = cut_at_stop(text, seq.req.stop) or ""
        seq.result = build_result(seq, text, self.worker_id)
        if reason == "cancelled":
            error = "cancelled: the caller went away before the answer was complete"
            seq.result = replace(seq.result, error=error, error_kind=ErrorKind.CANCELLED)
            self.counters.add(CANCELLED_REQUESTS)
        elif seq.write_cache or seq.use_cache:
            self._count(seq)
            if seq.audit and seq.cached_tokens:
                self._audit(seq)
        seq.emit(Chunk("", (), seq.result))
        seq.done.set()

    # ---- request path helpers ------------------------------------------------------

    def _prompt_ids(self, req: Request, token_ids: Sequence[int] | None) -> tuple[list[int], Problem | None]:
        if token_ids is not None:
            ids = list(token_ids)
        elif isinstance(req.prompt, str):
            ids = self.tokenize(req.prompt)
        else:
            ids = list(req.prompt)
        problem = prompt_ids_problem(ids, req.max_new_tokens, self.loaded.vocab_size, self.loaded.max_context)
        if problem is not None:
            return ids, problem
        total = len(ids) + req.max_new_tokens
        blocks = -(-total // self.block_size)
        if blocks > self.store.device_pool.capacity:
            return ids, Problem(
                ErrorKind.CONTEXT_EXCEEDED,
                f"prompt ({len(ids)} tokens) plus max_new_tokens ({req.max_new_tokens}) needs {blocks} KV blocks and "
                f"the device cache holds {self.store.device_pool.capacity}; shorten the request or raise --device-cache-gb",
            )
        return ids, None

    def _fetch_for(self, seq: Seq, hint: PeerHint) -> None:
        got = fetch_prefix(
            self.store,
            self.costs,
            self.peer_fetcher,
            hint,
            seq.chain,
            seq.chain_blocks,
            self.dtype,
            self.counters,
        )
        if got is not None:
            seq.peer_hold, lo, hi = got
            seq.peer_blocks = (lo, hi)

    def _prefetch_from_disk(self, seq: Seq) -> None:
        """Read the disk part of seq's cached prefix into the host tier in the submitting thread
        (the store lock is released while the disk reads), so admission only promotes it."""
        self.store.prefetch(seq.chain, seq.chain_blocks)

    def _disk_read_pays(self, n_blocks: int) -> bool:
        """The store's read policy: a disk hit of n blocks is read only when that beats prefilling."""
        return self.costs.disk_read_pays(n_blocks, self.block_size)

    def _audit(self, seq: Seq) -> None:
        """Recompute a hit without the cache (queued like any request); a difference beyond float
        noise is a mismatch."""
        cached = seq.prompt_logits
        req = Request(seq.prompt, max_new_tokens=0, cache_salt=seq.req.cache_salt)
        ref = Seq(req, seq.prompt, seq.root, make_generator(0), time.perf_counter(), use_cache=False, write_cache=False)
        ref.capture_logits = True

        def compare(chunk: Chunk) -> None:
            if chunk.result is None:
                return
            self._audits -= 1
            if ref.prompt_logits is None:
                return
            diff = float((ref.prompt_logits - cached).abs().max())
            self.counters.add(AUDIT_CHECKED)
            if diff > AUDIT_TOLERANCE.get(self.dtype, 1e-3):
                self.counters.add(AUDIT_MISMATCHES)
                log.error("audit: cached prefill differs from a fresh one by %.3g (%d tokens)", diff, len(seq.prompt))

        ref.sink = compare
        self._audits += 1
        self._inbox.append(ref)

    def _count(self, seq: Seq) -> None:
        counts = worker_request_counts(len(seq.prompt), seq.cached_tokens, seq.by_tier, len(seq.out), seq.result.ttft_s)
        self.counters.add_many(counts)

    def refine_prefill_cost(self) -> float:
        """Time one prefill again and keep the lower seconds per token; returns the cost kept.

        Noise (other processes, a start-up beside other workers) only ever adds time, so the minimum
        over a few idle moments converges on what the device costs. Measured once at start-up, two
        identical CPU workers started together read 0.55 and 1.11 ms/token, and the router then
        fetched prefixes to the "faster" one instead of using the holder. Needs the step loop
        (`start` / `on_own_thread`): the forward runs there, never on the calling thread."""
        if self._loop is None:
            raise RuntimeError("refine_prefill_cost needs the engine's step loop (Engine.start or on_own_thread)")
        measured = self._measure_prefill(rounds=1, warm_up=False)
        with self._costs_lock:
            if measured < self.costs.prefill_s_per_token:
                self.costs = replace(self.costs, prefill_s_per_token=measured)
            return self.costs.prefill_s_per_token

    def update_costs(self, **terms: float) -> CostModel:
        """Set some cost terms; the rest stay (the actor's transfer calibration and the idle
        re-timing run on different threads, and neither may undo the other)."""
        with self._costs_lock:
            self.costs = replace(self.costs, **terms)
            return self.costs

    def _measure_prefill(self, rounds: int = 2, warm_up: bool = True) -> float:
        """Seconds per prefill token, timed on this device through the engine's own path (best of
        `rounds`, after an untimed warm-up unless told otherwise)."""
        room = (self.store.device_pool.capacity - 1) * self.block_size
        n = max(1, min(256, self.loaded.max_context // 2, self.config.max_batch_tokens, room))
        ids = [i % self.loaded.vocab_size for i in range(n)]
        best = float("inf")
        for i in range(rounds + warm_up):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            seq = self.submit(Request(ids, max_new_tokens=0), use_cache=False, write_cache=False)
            if isinstance(seq, Result):
                raise ValueError(f"cannot time a prefill of {n} tokens: {seq.error}")
            if not self.wait(seq).ok:  # failed fast (the engine closing): its time says nothing
                raise ValueError(f"the timed prefill of {n} tokens failed")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warm_up:
                best = min(best, time.perf_counter() - t)
        return best / n


def _forward_failed(error: Exception) -> str:
    return f"the model's forward pass failed: {type(error).__name__}: {error}"
