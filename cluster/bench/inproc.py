"""In-process modes: plain transformers (a), the manual prompt-cache recipe (b), the suffix-only limit,
and this project's Engine without Ray (for the prefix sweep and the cold overhead).

Every mode decodes with the same greedy loop over a DynamicCache, so what differs between them is
only how the prompt's KV is obtained. One request at a time; torch threads as the caller set them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from worker.engine import Engine
from worker.models import cache_kwargs
from worker.request import Request


@dataclass(frozen=True)
class Sample:
    ttft_s: float  # prefill (and any cache handling) to the first token
    latency_s: float  # to the last token
    prompt_tokens: int
    cached_tokens: int
    new_tokens: int
    queue_s: float = 0.0


def _forward(model, ids: list[int], cache: DynamicCache, start: int) -> torch.Tensor:
    inp = torch.tensor([ids], device=model.device)
    pos = torch.arange(start, start + len(ids), device=model.device).unsqueeze(0)
    kw = cache_kwargs(model, cache)
    return model(input_ids=inp, position_ids=pos, use_cache=True, logits_to_keep=1, **kw).logits[0, -1]


@torch.inference_mode()
def _decode(model, logits, cache, pos, n_new, t0):
    tok = int(torch.argmax(logits))
    t_first = time.perf_counter()
    for _ in range(n_new - 1):
        logits = _forward(model, [tok], cache, pos)
        pos += 1
        tok = int(torch.argmax(logits))
    return t_first - t0, time.perf_counter() - t0


class Plain:
    """(a) plain transformers: full prefill every time, no reuse."""

    name = "a. plain transformers"

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def run(self, ids: list[int], n_new: int) -> Sample:
        t0 = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        logits = _forward(self.model, ids, cache, 0)
        ttft, lat = _decode(self.model, logits, cache, len(ids), n_new, t0)
        return Sample(ttft, lat, len(ids), 0, n_new)


class Recipe:
    """(b) the transformers manual prompt-cache recipe: prefill each system prompt once, deep-copy
    that cache for every request, run the rest of the prompt on the copy."""

    name = "b. transformers prompt-cache recipe"

    def __init__(self, model):
        self.model = model
        self.caches: dict[tuple[int, ...], DynamicCache] = {}

    def memory_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for c in self.caches.values() for layer in c.layers)

    @torch.inference_mode()
    def run(self, system: list[int], suffix: list[int], n_new: int) -> Sample:
        t0 = time.perf_counter()
        key = tuple(system)
        cached = key in self.caches
        if not cached:
            cache = DynamicCache(config=self.model.config)
            _forward(self.model, system, cache, 0)
            self.caches[key] = cache
        work = copy.deepcopy(self.caches[key])
        logits = _forward(self.model, suffix, work, len(system))
        ttft, lat = _decode(self.model, logits, work, len(system) + len(suffix), n_new, t0)
        return Sample(ttft, lat, len(system) + len(suffix), len(system) if cached else 0, n_new)


@torch.inference_mode()
def suffix_limit(model, prefix: list[int], suffix: list[int], repeats: int = 3) -> float:
    """The floor for a cached request: the prefix's KV is already in a DynamicCache (not timed);
    time only the forward pass over the suffix and the first token. Best of `repeats`."""
    base = DynamicCache(config=model.config)
    _forward(model, prefix, base, 0)
    best = float("inf")
    for _ in range(repeats):
        work = copy.deepcopy(base)
        t0 = time.perf_counter()
        logits = _forward(model, suffix, work, len(prefix))
        int(torch.argmax(logits))
        best = min(best, time.perf_counter() - t0)
    return best


def engine_sample(engine: Engine, ids: list[int], n_new: int) -> Sample:
    r = engine.run(Request(ids, max_new_tokens=n_new))
    if not r.ok:
        raise RuntimeError(r.error)
    return Sample(r.ttft_s, r.latency_s, r.prompt_tokens, r.cached_tokens, len(r.token_ids), r.queue_s)
