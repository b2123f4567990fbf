"""Block tables of running requests over the store's device pool.

Rules (the store enforces the budget; this class keeps each request's table
consistent with what it pins and owns):
  - `admit` pins the longest cached prefix on device and points the table at
    those blocks in place. The last prompt token is always recomputed; when
    it falls inside a held block, that block is copied to a working slot
    first (copy on write), because a cached block is never overwritten.
  - `reserve` extends the table with working slots for the next n tokens.
  - `commit` advances `kv_len`; every block that is now full is hashed and
    adopted into the cache in place (pinned by this request), so concurrent
    requests and the next turn of a chat hit it while this one still runs.
  - `release` unpins the request's path and frees its working slots.
"""

from __future__ import annotations

from cache_store import EMPTY_HOLD, BlockHash, TieredStore, block_chain, block_hash, token_blocks
from worker.sequence import Sequence


class BlockManager:
    def __init__(self, store: TieredStore, block_size: int):
        self.store = store
        self.block_size = block_size

    def admit(self, seq: Sequence) -> int:
        """Point seq's table at its cached prefix; returns how many held blocks were found on device
        (the rest came from host), for `count_hits`."""
        bs = self.block_size
        tokens = seq.tokens
        hashes = block_chain(seq.root, tokens, bs)
        hold = EMPTY_HOLD
        if seq.use_cache:
            hold = self.store.acquire(hashes, token_blocks(tokens, bs), device_only=True)
        self.drop_peer_hold(seq)
        n_cached = min(len(hold) * bs, len(tokens) - 1)
        seq.pinned = hold.hashes
        seq.table = [b.slot for b in hold.blocks]
        seq.working = [False] * len(hold)
        seq.hashes = hashes[: len(hold)]
        if n_cached < len(hold) * bs and not self._copy_on_write(seq, len(hold) - 1):
            n_cached = (len(hold) - 1) * bs
        seq.kv_len = n_cached
        return hold.device_hits

    def drop_peer_hold(self, seq: Sequence) -> bool:
        """Unpin the blocks a waiting request fetched from a peer (they stay cached, evictable);
        True if it held any."""
        if seq.peer_hold is None:
            return False
        self.store.release(seq.peer_hold)
        seq.peer_hold = None
        return True

    def _copy_on_write(self, seq: Sequence, i: int) -> bool:
        """Give block i a private copy (its tail will be rewritten); False if no slot is free:
        the block is then simply recomputed."""
        slots = self.store.alloc_working(1)
        if not slots:
            self.store.release_path(seq.pinned[i:])
            del seq.pinned[i:], seq.table[i:], seq.working[i:], seq.hashes[i:]
            return False
        self.store.copy_working(seq.table[i], slots[0])
        seq.table[i], seq.working[i] = slots[0], True
        return True

    def count_hits(self, seq: Sequence, device_hits: int) -> None:
        """At the first admission: the prompt tokens it skips, by where their blocks came from."""
        bs = self.block_size
        lo, hi = seq.peer_blocks
        n_cached = seq.kv_len
        seq.cached_tokens = n_cached
        for i in range(len(seq.table)):
            source = "peer" if lo <= i < hi else ("device" if i < device_hits else "host")
            seq.by_tier[source] += max(0, min(bs, n_cached - i * bs))

    def blocks_needed(self, seq: Sequence, n: int) -> int:
        return max(0, -(-(seq.kv_len + n) // self.block_size) - len(seq.table))

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Working slots for the next n tokens; False (nothing taken) if the pool has no room."""
        need = self.blocks_needed(seq, n)
        if need == 0:
            return True
        slots = self.store.alloc_working(need)
        if slots is None:
            return False
        seq.table += slots
        seq.working += [True] * need
        return True

    def commit(self, seq: Sequence, n: int) -> None:
        """The KV of n more tokens is in the table: cache every block that is now full."""
        seq.kv_len += n
        bs = self.block_size
        tokens = seq.tokens
        for i in range(len(seq.hashes), seq.kv_len // bs):
            parent: BlockHash | None = seq.hashes[i - 1] if i else None
            toks = tokens[i * bs : (i + 1) * bs]
            h = block_hash(parent if parent is not None else seq.root, toks)
            seq.hashes.append(h)
            if not (seq.store and seq.working[i] and len(seq.pinned) == i):
                continue  # not caching, or an earlier block could not join: nothing below it can
            outcome = self.store.adopt(parent, h, toks, seq.table[i])
            if outcome != "refused":
                seq.pinned.append(h)
            if outcome == "adopted":
                seq.working[i] = False

    def release(self, seq: Sequence) -> None:
        if seq.pinned:
            self.store.release_path(seq.pinned)
        own = [slot for slot, w in zip(seq.table, seq.working) if w]
        if own:
            self.store.free_working(own)
        self.drop_peer_hold(seq)
        seq.pinned, seq.table, seq.working, seq.hashes = [], [], [], []
