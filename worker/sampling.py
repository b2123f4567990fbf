"""Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator.

Sampling runs on CPU in float32 so a seed gives the same tokens on any device.

Numerically safe for every value `Request.problem` accepts: a temperature below
`GREEDY_BELOW` is greedy (dividing by it would overflow float32 to inf and make
the probabilities NaN), and scores are made finite before the softmax, so one
request's parameters can never raise inside a step.
"""

from __future__ import annotations

import torch

# vLLM's threshold too: below it, temperature sampling is indistinguishable from argmax.
GREEDY_BELOW = 1e-5


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """logits: [vocab] for the last position."""
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    scores = logits.detach().to("cpu", torch.float32) / temperature
    scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        scores = scores.index_fill(0, order[drop], float("-inf"))
    if not torch.isfinite(scores).any():  # nothing left to sample from: the best logit wins
        return int(torch.argmax(logits))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen))
