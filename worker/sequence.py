"""One request inside the engine: its tokens, its block table, its progress and where its output goes.

Token bookkeeping: `tokens = prompt + generated`. `kv_len` tokens have their
KV in the blocks of `table` (device slots; block i holds tokens
[i*bs, (i+1)*bs)). Each step feeds `tokens[kv_len : kv_len + n]`; when that
reaches the last token, the step yields logits and a new token is sampled.
So prefill and decode are the same operation (decode is a chunk of one),
and the KV of the newest sampled token is computed by the next step.

Ownership: `pinned` is the path of cached blocks this request pins (root
first, contiguous); `working[i]` is True where table[i] is a private slot
of this request (not in the tree, or a duplicate of a cached block).
Both are undone by `BlockManager.release`.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cache_store import BlockHash, Hold
from worker.request import Chunk, Request, Result  # Chunk: re-exported for the engine's modules


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


Sink = Callable[[Chunk], None]


@dataclass(eq=False)
class Sequence:
    req: Request
    prompt: list[int]
    root: BlockHash  # namespace hash: model fingerprint + cache salt
    generator: torch.Generator
    arrived: float  # perf_counter when the worker got the request
    sink: Sink | None = None  # called with each Chunk, from the engine's thread
    use_cache: bool = True  # False: match nothing (audit, reference runs)
    store: bool = True  # False: adopt nothing into the cache
    capture_logits: bool = False  # keep the last prompt position's logits (tests, audit)
    audit: bool = False  # when it hit the cache, recompute it without and compare (engine audit)
    peer_hold: Hold | None = None  # blocks fetched from a peer before admission, pinned until then
    peer_blocks: tuple[int, int] = (0, 0)  # chain blocks [lo, hi) that came from a peer

    status: Status = Status.WAITING
    out: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    working: list[bool] = field(default_factory=list)
    pinned: list[BlockHash] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # chain of this sequence's full blocks so far
    kv_len: int = 0
    cached_tokens: int = 0
    by_tier: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "peer": 0})
    admitted: float | None = None  # perf_counter of the first admission
    t_first: float | None = None
    prompt_logits: torch.Tensor | None = None
    preemptions: int = 0
    sent_text: int = 0  # characters of decoded output already streamed
    sent_tokens: int = 0  # generated tokens already streamed
    finish_reason: str | None = None
    result: Result | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    progress: threading.Event = field(default_factory=threading.Event)  # set on every emitted chunk

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.out)

    @property
    def to_feed(self) -> int:
        """Tokens whose KV is not computed yet (>= 1 while running: the newest token)."""
        return self.num_tokens - self.kv_len

    @property
    def prefilling(self) -> bool:
        return self.to_feed > 1

    def emit(self, chunk: Chunk) -> None:
        if self.sink is not None:
            self.sink(chunk)
        self.progress.set()

    def mark_first_token(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
