"""Block tables of running requests over the store's device pool.

Rules (the store enforces the budget; this class keeps each request's
`BlockTable` consistent with what it pins and owns, see its invariants):
  - `open_table` pins the longest cached prefix on device and points the table at
    those blocks in place. The last prompt token is always recomputed; when
    it falls inside a held block, that block is copied to a working slot
    first (copy on write), because a cached block is never overwritten.
  - `reserve` extends the table with working slots for the next n tokens.
  - `commit` advances `kv_len`; every block that is now full is adopted into
    the cache in place (pinned by this request), so concurrent requests and
    the next turn of a chat hit it while this one still runs.
  - `release` unpins the request's path and frees its working slots and row.
Every table has a row in the runner's device-side array of block tables
(`rows` of them, one per request that may run at once), taken at `open_table`
and given back at `release`.
"""

from __future__ import annotations

from cache_store import EMPTY_HOLD, BlockHash, TieredStore, block_hash
from cache_store.counter_names import DEVICE, HOST, PEER
from worker.sequence import BlockTable, Entry, Sequence


class BlockManager:
    def __init__(self, store: TieredStore, block_size: int, rows: int):
        self.store = store
        self.block_size = block_size
        self._free_rows = list(range(rows - 1, -1, -1))

    def cached_blocks(self, seq: Sequence) -> int:
        """Leading blocks of seq cached here in any tier (nothing pinned, no access recorded)."""
        return self.store.lookup(seq.chain, seq.chain_blocks) if seq.use_cache else 0

    def open_table(self, seq: Sequence) -> int:
        """Point seq's table at its cached prefix; returns how many held blocks were found on device
        (the rest came from host), for `count_hits`."""
        bs = self.block_size
        hold = EMPTY_HOLD
        if seq.use_cache:
            hold = self.store.acquire(seq.chain, seq.chain_blocks, device_only=True)
        self.drop_peer_hold(seq)
        table = seq.blocks = BlockTable(row=self._free_rows.pop())
        table.entries = [Entry(b.slot, owned=False) for b in hold.blocks]
        table.pinned = table.full = len(hold)
        n_cached = min(len(hold) * bs, seq.num_tokens - 1)
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
        table = seq.blocks
        slots = self.store.alloc_working(1)
        if not slots:
            self.store.release_path(seq.chain[i : table.pinned])
            del table.entries[i:]
            table.pinned = table.full = i
            return False
        self.store.copy_working(table.slot(i), slots[0])
        table.entries[i] = Entry(slots[0], owned=True)
        return True

    def count_hits(self, seq: Sequence, device_hits: int) -> None:
        """At the first admission: the prompt tokens it skips, by where their blocks came from."""
        bs = self.block_size
        lo, hi = seq.peer_blocks
        n_cached = seq.kv_len
        seq.cached_tokens = n_cached
        for i in range(len(seq.blocks)):
            source = PEER if lo <= i < hi else (DEVICE if i < device_hits else HOST)
            seq.by_tier[source] += max(0, min(bs, n_cached - i * bs))

    def blocks_needed(self, seq: Sequence, n: int) -> int:
        return max(0, -(-(seq.kv_len + n) // self.block_size) - len(seq.blocks))

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Working slots for the next n tokens; False (nothing taken) if the pool has no room."""
        need = self.blocks_needed(seq, n)
        if need == 0:
            return True
        slots = self.store.alloc_working(need)
        if slots is None:
            return False
        seq.blocks.entries += [Entry(s, owned=True) for s in slots]
        return True

    def commit(self, seq: Sequence, n: int) -> None:
        """The KV of n more tokens is in the table: offer every block that is now full to the cache."""
        seq.kv_len += n
        bs = self.block_size
        table = seq.blocks
        for i in range(table.full, seq.kv_len // bs):
            toks = seq.token_range(i * bs, (i + 1) * bs)
            parent: BlockHash | None = seq.chain[i - 1] if i else None
            if i == len(seq.chain):  # a generated block: hashed once, when it fills
                seq.chain.append(block_hash(parent if parent is not None else seq.root, toks))
                seq.chain_blocks.append(tuple(toks))
            table.full = i + 1
            entry = table.entries[i]
            if not (seq.write_cache and entry.owned and table.pinned == i):
                continue  # not caching, or an earlier block could not join: nothing below it can
            outcome = self.store.adopt(parent, seq.chain[i], toks, entry.slot)
            if outcome != "refused":
                table.pinned += 1
            if outcome == "adopted":
                entry.owned = False

    def release(self, seq: Sequence) -> None:
        table = seq.blocks
        if table.pinned:
            self.store.release_path(seq.chain[: table.pinned])
        own = table.owned_slots()
        if own:
            self.store.free_working(own)
        self.drop_peer_hold(seq)
        if table.row >= 0:
            self._free_rows.append(table.row)
        seq.blocks = BlockTable()
