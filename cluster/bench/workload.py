"""Deterministic workloads shared by the demo, the tests and the benchmarks.

Text is made of English-looking words from a seeded generator, so sizes are
exact for the demo's byte tokenizer (one token per byte) and close for
others. Shapes:
  shared system prompts: K prompts, Zipf popularity, short user questions;
  multi-turn chats: each turn's prompt is the previous prompt + answer + a new question;
  cold: no two prompts share a block.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from worker.request import Request, Result

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part cache prefix token block model worker router cluster tenant answer question "
    "system prompt assistant helpful careful policy memory device host latency request reply user data"
).split()


def text(n_chars: int, rng: random.Random) -> str:
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(_WORDS)
        out.append(w)
        size += len(w) + 1
    return (" ".join(out) + " ")[:n_chars]


def system_prompts(k: int, min_chars: int, max_chars: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"System prompt #{i}. You are assistant {i}. " + text(rng.randint(min_chars, max_chars), rng) + "\n"
        for i in range(k)
    ]


def zipf_choices(n: int, k: int, s: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(k)]
    return rng.choices(range(k), weights=weights, k=n)


@dataclass(frozen=True)
class Workload:
    requests: list[Request]
    prefix_of: list[int]  # which system prompt each request uses (-1: none)
    prefixes: tuple[str, ...] = ()  # the system prompts


def shared_prompts(
    n: int,
    k: int,
    *,
    min_chars: int = 1000,
    max_chars: int = 2000,
    question_chars: int = 40,
    zipf_s: float = 1.1,
    max_new_tokens: int = 16,
    seed: int = 0,
    cache_salt: str | None = None,
) -> Workload:
    rng = random.Random(seed + 1)
    prompts = system_prompts(k, min_chars, max_chars, seed)
    picks = zipf_choices(n, k, zipf_s, rng)
    reqs = [
        Request(
            prompts[p] + f"User {i}: " + text(question_chars, rng) + "?\nAssistant:",
            max_new_tokens=max_new_tokens,
            cache_salt=cache_salt,
            id=f"q{i}",
        )
        for i, p in enumerate(picks)
    ]
    return Workload(reqs, picks, tuple(prompts))


def cold(n: int, chars: int, *, max_new_tokens: int = 16, seed: int = 0, cache_salt: str | None = None) -> Workload:
    rng = random.Random(seed + 7)
    reqs = [
        Request(f"{i}:" + text(chars, rng), max_new_tokens=max_new_tokens, cache_salt=cache_salt, id=f"c{i}")
        for i in range(n)
    ]
    return Workload(reqs, [-1] * n)


def chats(
    run: Callable[[list[Request]], list[Result]],
    n_chats: int,
    turns: int,
    *,
    system: str = "",
    turn_chars: int = 60,
    max_new_tokens: int = 16,
    seed: int = 0,
    cache_salt: str | None = None,
) -> Iterator[tuple[int, list[Result]]]:
    """Run chats turn by turn (all chats' turn t together); yields (turn, results)."""
    rng = random.Random(seed + 11)
    history = [system + f"Chat {c}.\n" for c in range(n_chats)]
    for t in range(turns):
        reqs = []
        for c in range(n_chats):
            history[c] += f"User: {text(turn_chars, rng)}\nAssistant:"
            reqs.append(Request(history[c], max_new_tokens=max_new_tokens, cache_salt=cache_salt, id=f"chat{c}-t{t}"))
        results = run(reqs)
        for c, r in enumerate(results):
            history[c] += r.text + "\n"
        yield t, results
