"""Which requests run in the next forward, and how many of their tokens.

Each step is ONE ragged batch under `max_batch_tokens`:
  1. the next token of every decoding request (oldest first),
  2. prefill chunks of running requests that are still prefilling, so a long
     uncached prompt delays the decodes by at most one chunk per step,
  3. newly admitted requests, first come first served, while fewer than
     `max_running` run and their next chunk's blocks fit.
A waiting request whose next prompt block a running request is computing
right now waits for it (it will hit instead of computing it again), unless
nothing else could run.

When the pool cannot hold the blocks of a running request's next tokens,
the newest running request is preempted: its blocks are released (its full
blocks stay cached, so resuming it mostly hits) and it goes back to the
front of the queue. The scheduler knows block tables, not models.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from cache_store import BlockHash
from worker.block_manager import BlockManager
from worker.sequence import Sequence, Status


@dataclass(frozen=True)
class Step:
    batch: list[tuple[Sequence, int]]  # (request, tokens to feed this step)
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_running: int, max_batch_tokens: int):
        self.blocks = blocks
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._computing: Counter[BlockHash] = Counter()  # prompt blocks running requests are prefilling
        self._prefill_blocks: dict[int, tuple[int, list[BlockHash]]] = {}  # id(seq) -> (first block, blocks left)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        batch: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        budget = self.max_batch_tokens
        for seq in [s for s in self.running if not s.prefilling] + [s for s in self.running if s.prefilling]:
            if seq.status is not Status.RUNNING or budget <= 0:
                continue
            n = min(seq.to_feed, budget)
            fits, freed = self._reserve(seq, n, batch, preempted)
            budget += freed
            if fits:
                batch.append((seq, n))
                budget -= n
        if not preempted:
            self._admit(batch, budget)
        return Step(batch, preempted)

    def _admit(self, batch: list[tuple[Sequence, int]], budget: int) -> None:
        deferred: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting.popleft()
            if self._would_duplicate(seq) and (self.running or self.waiting):
                deferred.append(seq)  # checked before pinning: a deferred request holds nothing new
                continue
            device_hits = self.blocks.open_table(seq)
            n = min(seq.to_feed, budget)
            if not self.blocks.reserve(seq, n):
                self.blocks.release(seq)
                self.waiting.appendleft(seq)
                break
            self._start(seq, device_hits)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))

    def _would_duplicate(self, seq: Sequence) -> bool:
        """Is the first prompt block this request would compute being computed by a running one?"""
        if not seq.use_cache or not self._computing:
            return False
        i = self.blocks.cached_blocks(seq)
        return i < len(seq.prompt) // self.blocks.block_size and self._computing[seq.chain[i]] > 0

    def _start(self, seq: Sequence, device_hits: int) -> None:
        if seq.admitted is None:
            self.blocks.count_hits(seq, device_hits)
            seq.admitted = time.perf_counter()
        seq.status = Status.RUNNING
        self.running.append(seq)
        if seq.write_cache and seq.use_cache:
            first = seq.blocks.full
            todo = seq.chain[first : len(seq.prompt) // self.blocks.block_size]
            self._prefill_blocks[id(seq)] = (first, todo)
            self._computing.update(todo)

    def committed(self, seq: Sequence) -> None:
        """After a step: blocks it finished are cached now, no longer 'being computed'."""
        first, todo = self._prefill_blocks.get(id(seq), (0, []))
        done = seq.blocks.full - first
        if todo and done > 0:
            self._computing.subtract(todo[:done])
            self._computing += Counter()  # drop zero counts
            self._prefill_blocks[id(seq)] = (first + done, todo[done:])

    def _reserve(self, seq: Sequence, n: int, batch, preempted) -> tuple[bool, int]:
        """Blocks for seq's next n tokens, preempting the newest running requests as needed.
        Returns (whether seq fits, tokens of the step's budget that preempted requests gave back)."""
        freed = 0
        while not self.blocks.reserve(seq, n):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
            freed += sum(k for s, k in batch if s is victim)
            batch[:] = [(s, k) for s, k in batch if s is not victim]
            if victim is seq:
                return False, freed
        return True, freed

    def preempt(self, seq: Sequence) -> None:
        self.finish(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take seq out of the running set and release its blocks (also used for cancelled and failed)."""
        if seq in self.running:
            self.running.remove(seq)
        _, todo = self._prefill_blocks.pop(id(seq), (0, []))
        if todo:
            self._computing.subtract(todo)
            self._computing += Counter()
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def drop_waiting(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
