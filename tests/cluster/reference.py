"""Cold reference outputs: the demo model through plain transformers generate(), no cache anywhere."""

from __future__ import annotations

from functools import lru_cache

import torch

from worker.demo_model import demo_model, demo_tokenizer


@lru_cache(maxsize=1)
def _model():
    return demo_model(), demo_tokenizer()


@torch.no_grad()
def greedy(prompt: str, max_new_tokens: int) -> tuple[int, ...]:
    model, tok = _model()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=258)
    return tuple(out[0, ids.shape[1] :].tolist())
