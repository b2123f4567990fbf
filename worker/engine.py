"""Engine: a transformers causal LM that prefills only the uncached suffix of each prompt.

Per request:
  1. hash the prompt's full blocks (namespace = model fingerprint + cache salt),
  2. pin the longest cached prefix (device tier; host tier promoted), and if
     the router says a peer holds more, pull that KV when cheaper than
     recomputing it (token ids verified; a failed pull is a recompute),
  3. assemble a DynamicCache from the pinned blocks (one gather per tier) and
     run the model on the rest of the prompt, always at least its last token
     (the logits of the last position are needed),
  4. decode, then store every new full block of prompt AND generated tokens
     (so a chat's next turn hits), publish, unpin.

Requests run one at a time at batch size 1, so the suffix is computed by the
same kernels on the same shapes as in an uncached run; that is what keeps
cached outputs equal to uncached ones (greedy tokens identical, float32
logits within 1e-4). `run`/`generate` serialize on an internal lock;
`stats` and `export_blocks` may be called from other threads.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache

from cache_store import (
    CacheConfig,
    Exported,
    Hold,
    IndexUnavailable,
    KVShape,
    LeaseKeeper,
    MetadataIndex,
    TieredStore,
    block_chain,
    root_hash,
    token_blocks,
)
from cache_store.hashing import BlockHash
from worker.costs import CostModel
from worker.models import LoadedModel, fingerprint, load_model, resolve_device, resolve_dtype
from worker.request import Request, Result
from worker.sampling import make_generator, next_token

log = logging.getLogger(__name__)
GB = 1 << 30
# Largest last-position logit difference the audit accepts between cached and fresh prefill:
# float noise of the two computation orders, far below what a wrong block produces.
AUDIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


@dataclass(frozen=True)
class PeerHint:
    """From the router: `worker_id` holds the first `blocks` blocks of this request's chain."""

    worker_id: str
    blocks: int


class PeerFetchError(Exception):
    """A peer could not deliver blocks (dead, timed out, refused); the engine recomputes."""


PeerFetcher = Callable[[str, list[BlockHash]], Exported]


class Prefill(NamedTuple):
    cache: DynamicCache
    logits: torch.Tensor  # [vocab], last prompt position
    hold: Hold
    cached_tokens: int
    by_tier: dict[str, int]  # cached tokens per source: device, host, peer


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig,
        *,
        device: torch.device,
        worker_id: str = "local",
        index: MetadataIndex | None = None,
        model_fingerprint: str | None = None,
        peer_fetcher: PeerFetcher | None = None,
        audit_fraction: float = 0.0,
        audit_seed: int | None = None,
    ):
        if not 0.0 <= audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction must be in [0, 1], got {audit_fraction!r}")
        self.audit_fraction = audit_fraction
        self._audit_rng = random.Random(audit_seed)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = device
        self.worker_id = worker_id
        self.block_size = cache_config.block_size
        self.dtype = next(self.model.parameters()).dtype
        self.fingerprint = model_fingerprint or fingerprint(self.model, self.tokenizer, self.block_size)
        lay = loaded.layout
        shape = KVShape(lay.layers, lay.kv_heads, cache_config.block_size, lay.head_dim, self.dtype)
        self.store = TieredStore(cache_config, shape, device)
        self.counters = self.store.counters
        self.peer_fetcher = peer_fetcher
        self._lock = threading.Lock()
        self._keep_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.costs = CostModel(prefill_s_per_token=self._measure_prefill())
        self.index = index
        self.keeper: LeaseKeeper | None = None
        if index is not None:
            self.keeper = LeaseKeeper(index, self.store, worker_id, info=self.info(), gauges=self.gauges)
            self.keeper.start()

    @classmethod
    def from_pretrained(
        cls,
        model: str = "demo",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        block_size: int = 16,
        device_cache_gb: float = 0.5,
        host_cache_gb: float = 1.0,
        eviction: str = "lru",
        redis_url: str | None = None,
        service: str = "default",
        worker_id: str | None = None,
        cache_config: CacheConfig | None = None,
        peer_fetcher: PeerFetcher | None = None,
        audit_fraction: float = 0.0,
    ) -> Engine:
        """Load 'demo' or a local Hugging Face causal-LM directory with a fresh cache.

        With `redis_url`, the engine takes a lease in that index and publishes its blocks.
        `audit_fraction` of cache hits are re-computed without the cache and compared
        (counters `audit_checked` / `audit_mismatches`; expected 0 mismatches).
        """
        config = cache_config or CacheConfig(
            block_size=block_size,
            device_bytes=int(device_cache_gb * GB),
            host_bytes=int(host_cache_gb * GB),
            eviction=eviction,
            service=service,
        )
        dev = resolve_device(device)
        loaded = load_model(model, dev, resolve_dtype(dtype, dev))
        index = MetadataIndex(redis_url, config) if redis_url else None
        wid = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        return cls(
            loaded,
            config,
            device=dev,
            worker_id=wid,
            index=index,
            peer_fetcher=peer_fetcher,
            audit_fraction=audit_fraction,
        )

    # ---- public API -----------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]] | str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        cache_salt: str | None = None,
    ) -> list[Result]:
        """One Result per prompt, in order. A bad prompt gets a Result with `error`; the rest still run."""
        if isinstance(prompts, str):
            prompts = [prompts]
        stops = tuple(stop) if isinstance(stop, (list, tuple)) else ((stop,) if isinstance(stop, str) else ())
        return [
            self.run(Request(p, max_new_tokens, temperature, top_p, top_k, seed, stops, cache_salt)) for p in prompts
        ]

    def run(
        self,
        req: Request,
        *,
        token_ids: Sequence[int] | None = None,
        hint: PeerHint | None = None,
        arrived: float | None = None,
    ) -> Result:
        """Serve one request. `token_ids` (from the router) skips tokenization; `arrived` is when the
        worker received it (perf_counter): `queue_s` is the wait from then until the engine took it,
        `ttft_s` runs from there to the first token, `latency_s` from arrival to the end."""
        t0 = arrived if arrived is not None else time.perf_counter()
        problem = req.problem()
        ids: list[int] = []
        if problem is None:
            ids, problem = self._prompt_ids(req, token_ids)
        if problem is not None:
            self.counters.add("rejected_requests")
            return Result.failed(problem, id=req.id, worker_id=self.worker_id, prompt_tokens=len(ids))
        with self._lock:
            return self._run(req, ids, hint, t0, time.perf_counter())

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def chain(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[BlockHash]:
        return block_chain(root_hash(self.fingerprint, cache_salt), token_ids, self.block_size)

    @torch.inference_mode()
    def prefill_logits(self, token_ids: Sequence[int], cache_salt: str | None = None, *, use_cache: bool = True):
        """(logits, cached tokens per source) of the last prompt position, via the same path as `run`
        but without decoding or storing anything. Logits are float32 on CPU. Used by the exactness
        tests and the audit."""
        ids = list(token_ids)
        with self._lock:
            if not use_cache:
                logits = self._forward(ids, DynamicCache(config=self.model.config), 0)
                return logits.float().cpu(), {"device": 0, "host": 0, "peer": 0}
            pre = self._prefill(ids, cache_salt, None)
            self.store.release(pre.hold)
            return pre.logits.float().cpu(), pre.by_tier

    def export_blocks(self, hashes: Sequence[BlockHash]) -> Exported:
        """KV of the leading run of `hashes` held here (for a peer)."""
        return self.store.export(list(hashes))

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
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "block_bytes": self.store.shape.block_bytes,
            "max_context": self.loaded.max_context,
            "vocab_size": self.loaded.vocab_size,
            "prefill_us_per_token": round(self.costs.prefill_s_per_token * 1e6, 3) if hasattr(self, "costs") else 0,
        }

    def gauges(self) -> dict[str, object]:
        s = self.store.stats()
        return {
            "device_blocks": s.device.blocks,
            "device_capacity": s.device.capacity,
            "host_blocks": s.host.blocks,
            "host_capacity": s.host.capacity,
            "pinned_blocks": s.device.pinned + s.host.pinned,
        }

    def stats(self) -> dict[str, object]:
        s = self.store.stats()
        return {
            **self.info(),
            "device_tier": s.device._asdict(),
            "host_tier": s.host._asdict(),
            "counters": s.counters,
            "costs": self.costs.to_dict(self.block_size),
            "index_connected": bool(self.keeper and self.keeper.connected),
        }

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self.index is not None:
            self.index.close()

    # ---- request path ------------------------------------------------------------

    def _prompt_ids(self, req: Request, token_ids: Sequence[int] | None) -> tuple[list[int], str | None]:
        if token_ids is not None:
            ids = list(token_ids)
        elif isinstance(req.prompt, str):
            ids = self.tokenize(req.prompt)
        else:
            ids = list(req.prompt)
        if not ids:
            return ids, "prompt tokenizes to no tokens; send some text"
        vocab = self.loaded.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            return ids, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab}); send ids below {vocab}"
        ctx = self.loaded.max_context
        if len(ids) + req.max_new_tokens > ctx:
            return ids, (
                f"prompt has {len(ids)} tokens and max_new_tokens is {req.max_new_tokens}: {len(ids) + req.max_new_tokens} "
                f"exceeds the model context of {ctx}; shorten the prompt or lower max_new_tokens"
            )
        return ids, None

    @torch.inference_mode()
    def _run(self, req: Request, ids: list[int], hint: PeerHint | None, arrived: float, t0: float) -> Result:
        pre = self._prefill(ids, req.cache_salt, hint)
        try:
            out, finish, t_first = self._decode(req, pre)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if finish == "stop":
                text = _cut_at_stop(text, req.stop)
            self._write_back(ids + out, req.cache_salt, pre)
        finally:
            self.store.release(pre.hold)
        if pre.cached_tokens and self.audit_fraction and self._audit_rng.random() < self.audit_fraction:
            self._audit(ids, pre.logits)
        done = time.perf_counter()
        ttft = (t_first or done) - t0
        self._count(ids, pre, out, ttft)
        return Result(
            text=text,
            token_ids=tuple(out),
            prompt_tokens=len(ids),
            cached_tokens=pre.cached_tokens,
            worker_id=self.worker_id,
            ttft_s=ttft,
            id=req.id,
            finish_reason=finish,
            latency_s=done - arrived,
            queue_s=t0 - arrived,
            cached_device_tokens=pre.by_tier["device"],
            cached_host_tokens=pre.by_tier["host"],
            cached_peer_tokens=pre.by_tier["peer"],
        )

    def _prefill(self, ids: list[int], salt: str | None, hint: PeerHint | None) -> Prefill:
        bs = self.block_size
        hashes = self.chain(ids, salt)
        blocks = token_blocks(ids, bs)
        hold = self.store.acquire(hashes, blocks)
        local = len(hold)
        sources = ["device"] * hold.device_hits + ["host"] * hold.host_hits
        try:
            if hint is not None and hint.blocks > local and self.peer_fetcher is not None:
                hold = self._fetch_from_peer(hint, hashes, blocks, hold)
                sources += ["peer"] * (len(hold) - local)
            n_cached = min(len(hold) * bs, len(ids) - 1)  # the last prompt token is always recomputed
            cache = self._cache_from(self.store.gather(hold, n_cached) if n_cached else [])
            logits = self._forward(ids[n_cached:], cache, n_cached)
        except BaseException:
            self.store.release(hold)
            raise
        by_tier = {"device": 0, "host": 0, "peer": 0}
        for i, source in enumerate(sources):
            by_tier[source] += max(0, min(bs, n_cached - i * bs))
        return Prefill(cache, logits, hold, n_cached, by_tier)

    def _cache_from(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        """A DynamicCache holding the gathered prefix as is. (`DynamicCache(ddp_cache_data=kv)` would
        concatenate every layer onto an empty tensor: one more copy of the whole prefix per request.)"""
        cache = DynamicCache(config=self.model.config)
        if kv:
            if len(kv) != len(cache.layers):
                raise RuntimeError(f"{len(kv)} cached layers for a model with {len(cache.layers)}")
            for layer, (k, v) in zip(cache.layers, kv):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
        return cache

    def _forward(self, ids: Sequence[int], cache: DynamicCache, start: int) -> torch.Tensor:
        """Run `ids` at positions start.. on top of `cache` (mutated); logits of the last position."""
        inp = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        kw = {"logits_to_keep": 1} if self._keep_logits else {}
        out = self.model(input_ids=inp, past_key_values=cache, position_ids=pos, use_cache=True, **kw)
        return out.logits[0, -1]

    def _decode(self, req: Request, pre: Prefill) -> tuple[list[int], str, float | None]:
        out: list[int] = []
        if req.max_new_tokens == 0:
            return out, "length", None
        gen = make_generator(req.seed)
        logits, pos = pre.logits, pre.cache.get_seq_length()
        t_first = None
        while True:
            tok = next_token(logits, req.temperature, req.top_k, req.top_p, gen)
            out.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
            if tok in self.loaded.eos_ids:
                return out, "eos", t_first
            if req.stop and _cut_at_stop(self.tokenizer.decode(out, skip_special_tokens=True), req.stop) is not None:
                return out, "stop", t_first
            if len(out) >= req.max_new_tokens:
                return out, "length", t_first
            logits = self._forward([tok], pre.cache, pos)
            pos += 1

    def _write_back(self, seq: list[int], salt: str | None, pre: Prefill) -> None:
        """Store every full block whose KV the cache now holds (prompt and generated tokens)."""
        bs = self.block_size
        n_full = pre.cache.get_seq_length() // bs
        have = len(pre.hold)
        if n_full <= have:
            return
        hashes = self.chain(seq[: n_full * bs], salt)
        blocks = token_blocks(seq[: n_full * bs], bs)
        kv = _blocks_from_cache(pre.cache, have, n_full, bs)
        parent = hashes[have - 1] if have else None
        self.store.insert(parent, hashes[have:], blocks[have:], kv)

    def _fetch_from_peer(self, hint: PeerHint, hashes, blocks, hold: Hold) -> Hold:
        """Pull blocks [len(hold), hint.blocks) from the peer; returns the (possibly longer) hold."""
        local = len(hold)
        want = hashes[local : hint.blocks]
        if not self.costs.fetch_pays(len(want), self.block_size):
            self.counters.add("peer_fetch_skipped")
            return hold
        try:
            got = self.peer_fetcher(hint.worker_id, list(want))
        except PeerFetchError as e:
            log.warning("peer fetch from %s failed, recomputing: %s", hint.worker_id, e)
            self.counters.add("peer_fetch_failures")
            return hold
        n = 0
        for h, toks, want_h, want_toks in zip(got.hashes, got.tokens, want, blocks[local:]):
            if h != want_h or tuple(toks) != tuple(want_toks):
                break
            n += 1
        expected_shape = (len(got.hashes), *self.store.shape.block_dims)
        if n < len(want) and n < len(got.hashes):
            self.counters.add("peer_fetch_mismatches")
        if n == 0 or tuple(got.kv.shape) != expected_shape or got.kv.dtype != self.dtype:
            if n:
                self.counters.add("peer_fetch_failures")
            return hold
        parent = hashes[local - 1] if local else None
        self.store.insert(parent, want[:n], blocks[local : local + n], got.kv[:n])
        longer = self.store.acquire(hashes, blocks)
        self.store.release(hold)
        self.counters.add("peer_fetches")
        self.counters.add("peer_fetched_blocks", max(0, len(longer) - local))
        return longer

    def _audit(self, ids: list[int], cached_logits: torch.Tensor) -> None:
        """Recompute a hit without the cache; a difference beyond float noise is a mismatch."""
        fresh = self._forward(ids, DynamicCache(config=self.model.config), 0)
        diff = float((fresh.float() - cached_logits.float()).abs().max())
        self.counters.add("audit_checked")
        if diff > AUDIT_TOLERANCE.get(self.dtype, 1e-3):
            self.counters.add("audit_mismatches")
            log.error("audit: cached prefill differs from a fresh one by %.3g (prompt of %d tokens)", diff, len(ids))

    def _count(self, ids: list[int], pre: Prefill, out: list[int], ttft: float) -> None:
        self.counters.add_many(
            {
                "requests": 1,
                "hit_requests": int(pre.cached_tokens > 0),
                "prompt_tokens": len(ids),
                "cached_tokens": pre.cached_tokens,
                "hit_tokens_device": pre.by_tier["device"],
                "hit_tokens_host": pre.by_tier["host"],
                "hit_tokens_peer": pre.by_tier["peer"],
                "prefill_tokens": len(ids) - pre.cached_tokens,
                "generated_tokens": len(out),
                "ttft_us_sum": int(ttft * 1e6),
            }
        )

    def _measure_prefill(self) -> float:
        """Seconds per prefill token, timed on this device (best of 2 after a warm-up)."""
        n = max(16, min(256, self.loaded.max_context // 2))
        ids = [i % self.loaded.vocab_size for i in range(n)]
        best = float("inf")
        with torch.inference_mode():
            for i in range(3):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                self._forward(ids, DynamicCache(config=self.model.config), 0)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    best = min(best, time.perf_counter() - t)
        return best / n


def _blocks_from_cache(cache: DynamicCache, lo: int, hi: int, bs: int) -> torch.Tensor:
    """Blocks lo..hi of every layer as [n, layers, 2, kv_heads, block, head_dim] (a view; the pool copies)."""
    n = hi - lo
    layers = []
    for layer in cache.layers:
        k = layer.keys[0, :, lo * bs : hi * bs]  # [heads, n*bs, dim]
        v = layer.values[0, :, lo * bs : hi * bs]
        heads, _, dim = k.shape
        layers.append(torch.stack([k, v]).view(2, heads, n, bs, dim))
    return torch.stack(layers).permute(3, 0, 1, 2, 4, 5)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """`text` up to the first stop string, or None if none occurs."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else None
