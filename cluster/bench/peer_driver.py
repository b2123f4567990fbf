"""The one loop that feeds a benchmark plan to an engine, shared by both sides of `peer_vllm`.

Standard library only: the vLLM side runs it in vLLM's own venv (loaded by file path, see
`peer_vllm_side.py`), our side imports it as `cluster.bench.peer_driver`. Each side supplies a
`Backend`; everything that decides what is sent when, and what is recorded, lives here, so the
two engines see the same requests in the same order and are timed the same way.

A plan is JSON: {"phases": [phase, ...]} run in order, each phase
  {"name", "reset": bool, "warmup": [[ids]], "warmup_tokens": int,
   "prompts": [[ids]], "max_tokens": int, "concurrency": int}
`reset` empties the engine's prefix cache first; `warmup` prompts then run all at once, untimed
(to make system prompts hot); then `prompts` run closed loop: `concurrency` requests in flight,
the next sent as soon as one finishes (concurrency >= len(prompts) is "all at once").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Protocol

clock = time.perf_counter  # every stamp on both sides; only differences within one process are used


@dataclass
class Event:
    """`tokens` new output token ids of request `rid`, seen at `t`; `cached` (prompt tokens served
    from the prefix cache) is set when it finished; `error` when the engine failed it."""

    rid: int
    tokens: list[int]
    t: float
    finished: bool = False
    cached: int = 0
    error: str | None = None


class Backend(Protocol):
    def reset(self) -> None:
        """Forget every cached prefix (nothing is in flight when called)."""

    def submit(self, rid: int, ids: list[int], max_tokens: int) -> None:
        """Queue one greedy request of exactly `max_tokens` tokens (EOS ignored); returns at once."""

    def events(self) -> list[Event]:
        """Block until something happened to a request in flight; each new token once, stamped
        with `clock()` when the engine produced (or handed back) it."""


@dataclass
class Record:
    prompt: int  # prompt tokens
    submit: float
    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # one per token
    cached: int = 0
    done: float = 0.0


def drive(backend: Backend, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[list[Record], float]:
    """Closed loop over `prompts` (records in prompt order) and its wall time, first send to last token."""
    records: list[Record | None] = [None] * len(prompts)
    in_flight: set[int] = set()
    nxt = finished = 0
    t0 = clock()
    while finished < len(prompts):
        while len(in_flight) < max(1, concurrency) and nxt < len(prompts):
            records[nxt] = Record(len(prompts[nxt]), clock())
            backend.submit(nxt, prompts[nxt], max_tokens)
            in_flight.add(nxt)
            nxt += 1
        for ev in backend.events():
            rec = records[ev.rid]
            assert rec is not None and ev.rid in in_flight, f"event for request {ev.rid}, which is not in flight"
            if ev.error is not None:
                raise RuntimeError(f"the engine failed request {ev.rid}: {ev.error}")
            rec.tokens += ev.tokens
            rec.stamps += [ev.t] * len(ev.tokens)
            if ev.finished:
                rec.cached, rec.done = ev.cached, ev.t
                in_flight.discard(ev.rid)
                finished += 1
    return [r for r in records if r is not None], clock() - t0


def run_phase(backend: Backend, phase: dict) -> dict:
    if phase["reset"]:
        backend.reset()
    if phase["warmup"]:
        drive(backend, phase["warmup"], phase["warmup_tokens"], len(phase["warmup"]))
    records, wall = drive(backend, phase["prompts"], phase["max_tokens"], phase["concurrency"])
    return {"wall_s": wall, "records": [r.__dict__ for r in records]}


def run_plan(backend: Backend, plan: dict, log=print) -> dict[str, dict]:
    out = {}
    for phase in plan["phases"]:
        log(f"  {phase['name']}: {len(phase['prompts'])} requests, concurrency {phase['concurrency']}")
        out[phase["name"]] = run_phase(backend, phase)
    return out


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def save(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
