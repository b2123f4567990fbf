"""Plain-transformers references the exactness tests compare the engine against."""

from __future__ import annotations

import random

import torch

ATOL = 1e-4  # float32 last-position logits, cached or batched vs plain


def rand_ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


@torch.no_grad()
def reference(engine, ids, n_new=6):
    """Plain transformers: generate() with no cache reuse, and a full forward for the logits."""
    x = torch.tensor([ids])
    out = engine.model.generate(x, max_new_tokens=n_new, do_sample=False, pad_token_id=258)
    logits = engine.model(x).logits[0, -1].float()
    return tuple(out[0, len(ids) :].tolist()), logits
