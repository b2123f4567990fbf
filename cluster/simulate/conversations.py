"""Conversation-shaped traces in the Mooncake format, generated from a seed.

Production traffic is mostly conversations and agents: long sessions whose every turn extends the
previous prompt (prompt + answer + new question), many sessions at once, a user's think time
between turns, and a few shared system prompts under them. The Mooncake synthetic trace in
`../shared/traces` has little of that shape, so placement was tuned on traffic unlike the one that
matters at scale (issue 23). This makes such traces in code, so any size can be had from a seed.

    generate(seed=1, requests=12_000)        # the list of TraceRequest the simulator replays
    prefixcache simulate --trace conv:1:12000 --workers 64 --capacity-blocks 1500
    python -m cluster.simulate.conversations --seed 1 --requests 12000 --out conv.jsonl

How ids are given: each session is one token stream (its system prompt, then question, answer,
question, ...). Block i of a stream is `TRACE_BLOCK_TOKENS` tokens; a block that lies inside the
system prompt has that prompt's id (shared by every session on it), any other full block has an
id of its own session and position, so a turn shares exactly the previous turns' full blocks. A
partial last block gets a fresh id: its content changes when the stream grows past it.

The shape (`Shape`) is meant to look like a conversation service with long contexts and a low
reuse ceiling: many sessions are short (one or two turns), some turns paste a document or a tool's
output, and a simulated cache never holds an answer's blocks (the Mooncake format names only a
prompt's blocks), so every turn recomputes at least the previous answer and its own question.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.simulate.trace import TRACE_BLOCK_TOKENS, TraceRequest

SPEC = re.compile(r"^conv:(\d+):(\d+)$")
SPEC_FORM = "conv:SEED:REQUESTS"  # how a generated trace is named wherever a trace file is taken


@dataclass(frozen=True)
class Shape:
    """The distributions a conversation trace is drawn from (tokens, seconds)."""

    system_prompts: int = 6  # shared prompts under the sessions, Zipf popularity
    system_tokens: tuple[int, int] = (1_000, 4_000)  # each one's length, uniform
    system_zipf: float = 1.0
    no_system: float = 0.3  # sessions with no shared prompt at all
    single_turn: float = 0.55  # sessions of one request (one question, then gone)
    mean_turns: float = 3.0  # the others: 2 + geometric, this mean
    max_turns: int = 40
    question_median: int = 400  # lognormal, sigma 1
    document: float = 0.5  # a turn pastes a document or a tool's output ...
    document_tokens: tuple[int, int] = (2_000, 16_000)  # ... of this many tokens, log-uniform
    answer_median: int = 500  # lognormal, sigma 0.8, capped
    answer_max: int = 2_000
    think_s: float = 300.0  # mean pause between an answer and the next question, exponential
    decode_s_per_token: float = 0.02  # how long an answer takes to arrive (sets the next turn's time)
    max_context: int = 128_000  # a session ends before its prompt would pass this
    sessions_per_s: float = 3.0  # new sessions, Poisson


DEFAULT_SHAPE = Shape()


def parse_spec(spec: str) -> tuple[int, int] | None:
    """(seed, requests) of a `conv:SEED:REQUESTS` name; None when `spec` is not one (a file path)."""
    m = SPEC.match(spec)
    if m is None:
        if spec.startswith("conv:"):
            raise ValueError(f"generated trace {spec!r}: write it as {SPEC_FORM}, e.g. conv:1:12000")
        return None
    seed, requests = int(m.group(1)), int(m.group(2))
    if requests < 1:
        raise ValueError(f"generated trace {spec!r}: REQUESTS must be >= 1")
    return seed, requests


def generate(seed: int, requests: int, shape: Shape = DEFAULT_SHAPE) -> list[TraceRequest]:
    """`requests` requests of conversations drawn from `shape` with `seed`, in arrival order.

    Sessions start as a Poisson process and each runs its turns one after another (the next
    question arrives after the answer's decode and a think time), so many sessions interleave."""
    rng = random.Random(seed)
    ids = _Ids()
    systems = [rng.randint(*shape.system_tokens) for _ in range(shape.system_prompts)]
    weights = [1 / (k + 1) ** shape.system_zipf for k in range(shape.system_prompts)]
    out: list[TraceRequest] = []
    start = 0.0
    session = 0
    while len(out) < requests:
        start += rng.expovariate(shape.sessions_per_s)
        sys_k = None if rng.random() < shape.no_system else rng.choices(range(len(systems)), weights)[0]
        out.extend(_session(rng, shape, ids, session, start, sys_k, systems))
        session += 1
    out.sort(key=lambda r: r.arrival_s)  # stable: a session's turns keep their order
    return out[:requests]


class _Ids:
    """Trace block ids: one per system-prompt block, per (session, block) and per partial block."""

    def __init__(self) -> None:
        self._known: dict[tuple, int] = {}

    def of(self, key: tuple) -> int:
        return self._known.setdefault(key, len(self._known))

    def fresh(self) -> int:
        return self.of(("partial", len(self._known)))


def _session(
    rng: random.Random, shape: Shape, ids: _Ids, session: int, t: float, sys_k: int | None, systems: list[int]
) -> list[TraceRequest]:
    """One session's turns: each prompt is the previous one, its answer and a new question."""
    turns = 1 if rng.random() < shape.single_turn else 2 + _geometric(rng, shape.mean_turns - 2)
    sys_tokens = systems[sys_k] if sys_k is not None else 0
    context = sys_tokens
    out = []
    for _ in range(min(turns, shape.max_turns)):
        question = _lognormal(rng, shape.question_median, 1.0)
        if rng.random() < shape.document:
            lo, hi = shape.document_tokens
            question += int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        answer = min(shape.answer_max, _lognormal(rng, shape.answer_median, 0.8))
        prompt = context + question
        if prompt + answer > shape.max_context:
            break
        out.append(TraceRequest(round(t, 3), prompt, answer, _hash_ids(ids, session, sys_k, sys_tokens, prompt)))
        context = prompt + answer
        t += answer * shape.decode_s_per_token + rng.expovariate(1 / shape.think_s)
    return out


def _hash_ids(ids: _Ids, session: int, sys_k: int | None, sys_tokens: int, prompt: int) -> tuple[int, ...]:
    full, rest = divmod(prompt, TRACE_BLOCK_TOKENS)
    sys_blocks = sys_tokens // TRACE_BLOCK_TOKENS  # blocks wholly inside the shared prompt
    blocks = [ids.of(("sys", sys_k, i) if i < sys_blocks else ("s", session, i)) for i in range(full)]
    if rest:
        blocks.append(ids.fresh())
    return tuple(blocks)


def _lognormal(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, int(median * math.exp(rng.gauss(0.0, sigma))))


def _geometric(rng: random.Random, mean: float) -> int:
    """Failures before the first success, with this mean (0 when mean <= 0)."""
    if mean <= 0:
        return 0
    p = 1 / (mean + 1)
    return int(math.log(1 - rng.random()) / math.log(1 - p))


def to_jsonl(trace: list[TraceRequest]) -> str:
    """The Mooncake format: timestamp in ms, input/output lengths, hash_ids."""
    return "".join(
        json.dumps(
            {
                "timestamp": round(r.arrival_s * 1000),
                "input_length": r.input_tokens,
                "output_length": r.output_tokens,
                "hash_ids": list(r.hash_ids),
            }
        )
        + "\n"
        for r in trace
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a generated conversation trace (Mooncake format JSONL)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--requests", type=int, default=12_000)
    p.add_argument("--out", default="-", help="file to write (default: stdout)")
    args = p.parse_args(argv)
    text = to_jsonl(generate(args.seed, args.requests))
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
