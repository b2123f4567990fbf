"""One request inside the engine: its tokens, its block table, its progress and where its output goes.

Token bookkeeping: `prompt + out` are the tokens. `kv_len` of them have their
KV in the blocks of `blocks` (device slots; entry i holds tokens
[i*bs, (i+1)*bs)). Each step feeds tokens [kv_len, kv_len + n); when that
reaches the last token, the step yields logits and a new token is sampled.
So prefill and decode are the same operation (decode is a chunk of one),
and the KV of the newest sampled token is computed by the next step.

`chain[i]` is the hash of token block i (prompt blocks hashed once at
submission; a generated block when it fills). It outlives the block table:
a preempted request re-admits with the chain it already has.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cache_store import BlockHash, Hold
from cache_store.counter_names import HIT_TIERS
from worker.request import Chunk, Request, Result  # Chunk: re-exported for the engine's modules


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


Sink = Callable[[Chunk], None]


@dataclass(slots=True)
class Entry:
    """One block of a sequence's table."""

    slot: int  # device pool slot holding the block's KV
    owned: bool  # a private working slot, freed at release (else: a cached block, pinned, in place)


@dataclass(eq=False)
class BlockTable:
    """A sequence's device blocks. Invariants (kept by `BlockManager`):
      - entries[:pinned] are on the cached path this sequence pins (root first, contiguous,
        hashes `chain[:pinned]`); the last of them may be `owned`, a private copy of the cached
        block (copy on write: its tail is recomputed, a cached block is never written);
      - entries[pinned:] are owned working slots;
      - entries[:full] are full blocks already offered to the cache (`commit`).
    `row` is the table's row in the runner's device-side block table array and `synced` how many
    entries that row holds already: only entries added since are written there."""

    entries: list[Entry] = field(default_factory=list)
    pinned: int = 0
    full: int = 0
    row: int = -1
    synced: int = 0

    def __len__(self) -> int:
        return len(self.entries)

    def slot(self, i: int) -> int:
        return self.entries[i].slot

    def owned_slots(self) -> list[int]:
        return [e.slot for e in self.entries if e.owned]


@dataclass(eq=False)
class Sequence:
    req: Request
    prompt: list[int]
    root: BlockHash  # namespace hash: model fingerprint + cache salt
    generator: torch.Generator
    arrived: float  # perf_counter when the worker got the request
    sink: Sink | None = None  # called with each Chunk, from the engine's thread
    use_cache: bool = True  # False: match nothing (audit, reference runs)
    write_cache: bool = True  # False: adopt nothing into the cache (use_cache: read from it)
    capture_logits: bool = False  # keep the last prompt position's logits (tests, audit)
    audit: bool = False  # when it hit the cache, recompute it without and compare (engine audit)
    peer_hold: Hold | None = None  # blocks fetched from a peer before admission, pinned until then
    peer_blocks: tuple[int, int] = (0, 0)  # chain blocks [lo, hi) that came from a peer
    chain: list[BlockHash] = field(default_factory=list)  # hash of each full token block (see above)
    chain_blocks: list[tuple[int, ...]] = field(default_factory=list)  # those blocks' tokens

    status: Status = Status.WAITING
    out: list[int] = field(default_factory=list)
    blocks: BlockTable = field(default_factory=BlockTable)
    kv_len: int = 0
    cached_tokens: int = 0
    by_tier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HIT_TIERS, 0))
    admitted: float | None = None  # perf_counter of the first admission
    t_first: float | None = None
    prompt_logits: torch.Tensor | None = None
    preemptions: int = 0
    sent_tokens: int = 0  # generated tokens already streamed
    detok: Any = None  # worker.output.DecodeState: the incremental detokenizer's position
    finish_reason: str | None = None
    result: Result | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    progress: threading.Event = field(default_factory=threading.Event)  # set on every emitted chunk

    @property
    def tokens(self) -> list[int]:
        """Every token (a new list: O(context); the step uses `token_range`)."""
        return self.prompt + self.out

    def token_range(self, lo: int, hi: int) -> list[int]:
        """tokens[lo:hi] without building the whole list."""
        p = len(self.prompt)
        if hi <= p:
            return self.prompt[lo:hi]
        if lo >= p:
            return self.out[lo - p : hi - p]
        return self.prompt[lo:] + self.out[: hi - p]

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
