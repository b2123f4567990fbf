"""TieredStore: prefix tree + device pool + host pool + eviction + index publishing.

Moves between tiers:
    insert   new blocks go to device; if the device cannot make room (all
             pinned) they go to host; if neither, they are not cached.
    spill    device full -> unpinned device leaves (policy order) move to host.
    drop     host full -> unpinned host leaves are dropped; with no host
             room, device leaves are dropped instead.
    promote  a host hit moves to device when room can be made; otherwise it
             is served from host (copied to device for the forward pass).
Every move is published to the metadata index in one pipelined write at the
end of the operation that caused it. If the index is down the store keeps
serving and marks itself for a full re-publish (`resync`).

Working blocks (the engine's paged KV): a running request also owns
private device slots (`alloc_working`) for the blocks it is filling. They
count against the device budget like cached blocks (so the pool never
exceeds it) and are never evicted; a block that fills up joins the tree in
place (`adopt`: no copy) and stays pinned by its request until `release`.

Lock rule: every public method takes the store lock; pools and tree are
only touched under it. A `Hold` pins its blocks until `release`: pinned
blocks are never evicted, spilled, dropped or overwritten, so `gather` of a
held prefix reads stable slots, and the engine's attention may read and
write a request's own slots (held or working) without the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from cache_store.config import CacheConfig
from cache_store.counter_names import dropped_blocks
from cache_store.counters import Counters
from cache_store.errors import IndexUnavailable
from cache_store.hashing import BlockHash
from cache_store.index import MetadataIndex, Op
from cache_store.kv_pool import KVPool, KVShape
from cache_store.policy import make_policy
from cache_store.tree import DEVICE, HOST, BlockRef, PrefixTree, Tier

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [1, kv_heads, seq, head_dim] each
Adoption = Literal["adopted", "shared", "refused"]


class Hold(NamedTuple):
    """A pinned cached prefix: the leading blocks of a chain, root first. Release it."""

    blocks: tuple[BlockRef, ...]  # locations after promotion
    device_hits: int  # of these, found on device
    host_hits: int  # found on host (then promoted where room allowed)

    @property
    def hashes(self) -> list[BlockHash]:
        return [b.hash for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)


EMPTY_HOLD = Hold((), 0, 0)


class Exported(NamedTuple):
    """Blocks copied out for a peer: hashes, their token ids, KV [n, layers, 2, kv_heads, block, head_dim] on CPU."""

    hashes: list[BlockHash]
    tokens: list[tuple[int, ...]]
    kv: torch.Tensor


class TierStats(NamedTuple):
    blocks: int
    capacity: int
    pinned: int
    evictable: int
    bytes_used: int
    bytes_capacity: int


class StoreStats(NamedTuple):
    device: TierStats
    host: TierStats
    counters: dict[str, int]


class TieredStore:
    def __init__(self, config: CacheConfig, shape: KVShape, device: torch.device | str = "cpu"):
        if shape.block_size != config.block_size:
            raise ValueError(f"KV shape block_size {shape.block_size} != config block_size {config.block_size}")
        self.config = config
        self.shape = shape
        self.device = torch.device(device)
        self.device_pool = KVPool.from_budget(shape, config.device_bytes, self.device)
        if self.device_pool.capacity == 0:
            raise ValueError(
                f"device_bytes={config.device_bytes} holds no block of {shape.block_bytes} bytes; "
                f"raise it to at least {shape.block_bytes}"
            )
        self.host_pool = KVPool.from_budget(shape, config.host_bytes, "cpu", pin_memory=self.device.type == "cuda")
        self.tree = PrefixTree(make_policy(config.eviction, duplicates_first=config.duplicates_first))
        fraction = getattr(getattr(self.tree.policy, "base", self.tree.policy), "protected_fraction", None)
        if fraction is not None:  # a bounded protected segment: a share of each tier
            self.tree.set_protected_limit(DEVICE, int(fraction * self.device_pool.capacity))
            self.tree.set_protected_limit(HOST, int(fraction * self.host_pool.capacity))
        self.counters = Counters()
        self._lock = threading.RLock()
        self._user_pins: dict[BlockHash, list[Hold]] = {}
        self._events: list[tuple[Op, BlockHash, str]] = []
        self._index: MetadataIndex | None = None
        self._worker_id = ""
        self._generation: int | None = None
        self._dirty = True  # the index does not reflect this store yet
        self._working = 0  # device slots owned by running requests, outside the tree

    # ---- index link ----------------------------------------------------

    def bind_index(self, index: MetadataIndex, worker_id: str) -> None:
        with self._lock:
            self._index, self._worker_id = index, worker_id
            self._generation, self._dirty = None, True

    def set_generation(self, generation: int) -> None:
        """A (re)registration happened: the index holds nothing of ours under this generation."""
        with self._lock:
            self._generation, self._dirty = generation, True

    def mark_dirty(self) -> None:
        with self._lock:
            self._dirty = True

    @property
    def needs_resync(self) -> bool:
        return self._dirty and self._index is not None and self._generation is not None

    def resync(self) -> None:
        """Re-publish this store's whole state (raises IndexUnavailable; stays dirty then)."""
        with self._lock:
            if self._index is None or self._generation is None:
                return
            blocks = [(b.hash, b.tier) for b in self.tree.blocks()]
            self._index.replace_blocks(self._worker_id, self._generation, blocks)
            self._events.clear()
            self._dirty = False

    def _publish(self) -> None:
        events, self._events = self._events, []
        if not events or self._index is None or self._generation is None or self._dirty:
            return
        try:
            self._index.publish(self._worker_id, self._generation, events)
        except IndexUnavailable:
            self._dirty = True

    def refresh_copies(self) -> int:
        """Read, in one batched index call, how many workers hold each block that could be evicted next,
        for duplicates-first eviction. Call it periodically (e.g. with the heartbeat), never per
        eviction; the index is read outside the store lock. Returns blocks refreshed (0: no index).
        Raises IndexUnavailable; a failed refresh leaves the last view in place."""
        with self._lock:
            if self._index is None or not self.config.duplicates_first:
                return 0
            index, hashes = self._index, self.tree.candidates()
        counts = index.holder_counts(hashes) if hashes else {}
        with self._lock:
            self.tree.set_copies(counts)
        return len(counts)

    # ---- requests --------------------------------------------------------

    def lookup(self, hashes: Sequence[BlockHash], blocks: Sequence[Sequence[int]]) -> int:
        """How many leading blocks are cached here (no pin, no access recorded)."""
        with self._lock:
            return len(self.tree.match(hashes, blocks))

    def acquire(
        self, hashes: Sequence[BlockHash], blocks: Sequence[Sequence[int]], *, device_only: bool = False
    ) -> Hold:
        """Pin the longest verified cached prefix; promote its host part to device where room allows.

        device_only: cut the hold where promotion ran out of room, so every held block is on device
        (what a block table needs)."""
        with self._lock:
            refs = self.tree.match(hashes, blocks)
            if not refs:
                return EMPTY_HOLD
            path = [r.hash for r in refs]
            self.tree.pin(path)
            self.tree.touch(path)
            n_dev = sum(r.tier == DEVICE for r in refs)
            self._promote([r for r in refs if r.tier == HOST])
            self._publish()
            held = tuple(self.tree.get(h) for h in path)
            if device_only:
                keep = next((i for i, b in enumerate(held) if b.tier != DEVICE), len(held))
                self.tree.unpin(path[keep:])
                held = held[:keep]
            return Hold(held, min(n_dev, len(held)), max(0, len(held) - n_dev))

    def release(self, hold: Hold) -> None:
        with self._lock:
            self.tree.unpin(hold.hashes)

    # ---- working blocks (paged KV of running requests) ----------------------

    def alloc_working(self, n: int) -> list[int] | None:
        """n private device slots, evicting unpinned cached blocks (spill, else drop) to make room;
        None, with nothing taken, if pinned and working blocks leave too little room."""
        with self._lock:
            if n <= 0:
                return []
            if self._make_device_room(n) < n:
                self._publish()
                return None
            self._working += n
            self._publish()
            return self.device_pool.alloc(n)

    def free_working(self, slots: Sequence[int]) -> None:
        with self._lock:
            self.device_pool.free(slots)
            self._working -= len(slots)

    def copy_working(self, src_slot: int, dst_slot: int) -> None:
        """Copy one device block into a working slot (copy-on-write of a held block)."""
        with self._lock:
            self.device_pool.data[dst_slot].copy_(self.device_pool.data[src_slot])

    def adopt(self, parent: BlockHash | None, h: BlockHash, tokens: Sequence[int], slot: int) -> Adoption:
        """A working block just filled: cache it in place, pinned for its request (release unpins it).

        "adopted": the slot now belongs to the tree. "shared": `h` was already cached on device (a
        concurrent request computed it); that copy is pinned instead, so the caller's pinned path
        stays whole, and the slot stays working. "refused": the parent is not a pinned device block
        or `h` is cached with other tokens or on host; the slot stays working, nothing is pinned."""
        with self._lock:
            pnode = self.tree.get(parent) if parent is not None else None
            if parent is not None and (pnode is None or pnode.tier != DEVICE or not self.tree.refs(parent)):
                return "refused"
            if h in self.tree:
                if self.tree.tokens(h) == tuple(tokens) and self.tree.get(h).tier == DEVICE:
                    self.tree.pin([h])
                    self.tree.touch([h])
                    return "shared"
                return "refused"
            self.tree.insert(parent, h, tokens, DEVICE, slot)
            self.tree.pin([h])
            self._working -= 1
            self._events.append(("add", h, DEVICE))
            self.counters.add("inserted_blocks")
            self._publish()
            return "adopted"

    def release_path(self, hashes: Sequence[BlockHash]) -> None:
        with self._lock:
            self.tree.unpin(hashes)

    @property
    def working_blocks(self) -> int:
        return self._working

    def room(self) -> int:
        """Device blocks a request could still get: free + evictable cached blocks."""
        with self._lock:
            return self.device_pool.free_count + self.tree.stats().evictable[DEVICE]

    def gather(self, hold: Hold, n_tokens: int | None = None) -> KV:
        """Per-layer (key, value) of the held prefix on the store's device, cut to `n_tokens`."""
        with self._lock:
            dev = [b.slot for b in hold.blocks if b.tier == DEVICE]
            host = [b.slot for b in hold.blocks if b.tier == HOST]
            if dev and host and hold.blocks[len(dev) - 1].tier != DEVICE:
                raise AssertionError("tier invariant broken: host block before a device block in a held path")
            parts = [self.device_pool.gather(dev)] if dev or not host else []
            if host:
                parts.append([(k.to(self.device), v.to(self.device)) for k, v in self.host_pool.gather(host)])
        kv = (
            parts[0]
            if len(parts) == 1
            else [(torch.cat([a[0], b[0]], 2), torch.cat([a[1], b[1]], 2)) for a, b in zip(*parts)]
        )
        if n_tokens is not None:
            kv = [(k[:, :, :n_tokens], v[:, :, :n_tokens]) for k, v in kv]
        return kv

    def insert(
        self,
        parent: BlockHash | None,
        hashes: Sequence[BlockHash],
        blocks: Sequence[Sequence[int]],
        kv: torch.Tensor,
    ) -> int:
        """Cache the chain `hashes` below `parent`; returns how many leading blocks are now cached.

        kv: [n, layers, 2, kv_heads, block_size, head_dim], any device.
        Blocks already present are verified (same tokens) and skipped.
        """
        with self._lock:
            start, prev = 0, parent
            while start < len(hashes) and hashes[start] in self.tree:
                if self.tree.tokens(hashes[start]) != tuple(blocks[start]):
                    self.counters.add("hash_collisions")
                    return start
                prev, start = hashes[start], start + 1
            if start == len(hashes):
                return start
            if prev is not None and prev not in self.tree:
                return start  # the parent was evicted meanwhile: an orphan could never be matched
            path = self.tree.path(prev) if prev is not None else []
            self.tree.pin(path)  # making room must not evict the parent
            try:
                stored = self._insert_new(prev, hashes[start:], blocks[start:], kv[start:])
            finally:
                self.tree.unpin(path)
            self._publish()
            return start + stored

    def export(self, hashes: Sequence[BlockHash]) -> Exported:
        """Copy out the leading run of `hashes` held here, for a peer (CPU tensors)."""
        with self._lock:
            refs: list[BlockRef] = []
            for h in hashes:
                ref = self.tree.get(h)
                if ref is None:
                    break
                refs.append(ref)
            if not refs:
                return Exported([], [], torch.empty((0, *self.shape.block_dims), dtype=self.shape.dtype))
            parts = []
            for tier, pool in ((DEVICE, self.device_pool), (HOST, self.host_pool)):
                idx = [i for i, r in enumerate(refs) if r.tier == tier]
                if idx:
                    parts.append((idx, pool.read([refs[i].slot for i in idx]).cpu()))
            kv = torch.empty((len(refs), *self.shape.block_dims), dtype=self.shape.dtype)
            for idx, t in parts:
                kv[idx] = t
            self.counters.add("exported_blocks", len(refs))
            # a peer is about to hold these too: until the next refresh says otherwise, they are copies
            self.tree.set_copies({r.hash: 2 for r in refs})
            return Exported([r.hash for r in refs], [self.tree.tokens(r.hash) for r in refs], kv)

    # ---- operator controls -------------------------------------------------

    def pin_prefix(self, hashes: Sequence[BlockHash], blocks: Sequence[Sequence[int]]) -> int:
        """Pin a cached prefix until `unpin_prefix` (e.g. a system prompt that must stay). Returns blocks pinned."""
        hold = self.acquire(hashes, blocks)
        if hold.blocks:
            with self._lock:
                self._user_pins.setdefault(hold.blocks[-1].hash, []).append(hold)
        return len(hold)

    def unpin_prefix(self, hashes: Sequence[BlockHash]) -> BlockHash | None:
        """Undo the deepest `pin_prefix` along `hashes`; returns the last block of that pin, or None."""
        with self._lock:
            for h in reversed(hashes):
                holds = self._user_pins.get(h)
                if holds:
                    self.release(holds.pop())
                    if not holds:
                        del self._user_pins[h]
                    return h
            return None

    def clear(self) -> int:
        """Drop every cached block nothing pins, in both tiers (benchmarks start cold with it; a
        running request's blocks and `pin_prefix` pins stay). Returns blocks dropped."""
        with self._lock:
            dropped = 0
            while True:
                victims = {tier: self.tree.victims(tier, len(self.tree), spill=False) for tier in (HOST, DEVICE)}
                if not any(victims.values()):
                    break
                for tier, refs in victims.items():
                    self._drop(tier, refs)
                    dropped += len(refs)
            self._publish()
            return dropped

    def set_priority(self, hashes: Sequence[BlockHash], priority: int) -> None:
        """Eviction priority of cached blocks (used by the 'priority' policy; higher stays longer)."""
        with self._lock:
            self.tree.set_priority([h for h in hashes if h in self.tree], priority)

    def stats(self) -> StoreStats:
        with self._lock:
            t = self.tree.stats()
            tiers = []
            for tier, pool in ((DEVICE, self.device_pool), (HOST, self.host_pool)):
                bb = self.shape.block_bytes
                tiers.append(
                    TierStats(
                        t.blocks[tier],
                        pool.capacity,
                        t.pinned[tier],
                        t.evictable[tier],
                        pool.used_count * bb,
                        pool.capacity * bb,
                    )
                )
            return StoreStats(tiers[0], tiers[1], self.counters.snapshot())

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree and the pools disagree on what is used (tests call it)."""
        with self._lock:
            t = self.tree.stats()
            for tier, pool in ((DEVICE, self.device_pool), (HOST, self.host_pool)):
                working = self._working if tier == DEVICE else 0
                assert pool.used_count == t.blocks[tier] + working, (
                    f"{tier}: pool uses {pool.used_count}, tree has {t.blocks[tier]}, working {working}"
                )
                assert pool.used_count <= pool.capacity
                assert t.pinned[tier] + t.evictable[tier] == t.blocks[tier]

    # ---- internals (lock held) ---------------------------------------------

    def _insert_new(self, prev: BlockHash | None, hashes, blocks, kv: torch.Tensor) -> int:
        k = len(hashes)
        on_device = prev is None or self.tree.get(prev).tier == DEVICE
        n_dev = self._make_device_room(k) if on_device else 0
        n_host = self._make_host_room(k - n_dev) if k > n_dev else 0
        parent = prev
        for tier, pool, lo, hi in ((DEVICE, self.device_pool, 0, n_dev), (HOST, self.host_pool, n_dev, n_dev + n_host)):
            if hi == lo:
                continue
            slots = pool.alloc(hi - lo)
            pool.write(slots, kv[lo:hi])
            for i, slot in zip(range(lo, hi), slots):
                self.tree.insert(parent, hashes[i], blocks[i], tier, slot)
                self._events.append(("add", hashes[i], tier))
                parent = hashes[i]
        self.counters.add("inserted_blocks", n_dev + n_host)
        self.counters.add("insert_skipped_blocks", k - n_dev - n_host)
        return n_dev + n_host

    def _promote(self, host_refs: list[BlockRef]) -> None:
        """Move the host part of a pinned path to device, root side first, as far as room allows."""
        if not host_refs:
            return
        host_refs = host_refs[: self._make_device_room(len(host_refs))]
        if not host_refs:
            return
        slots = self.device_pool.alloc(len(host_refs))
        self.device_pool.write(slots, self.host_pool.read([r.slot for r in host_refs]))
        self.host_pool.free([r.slot for r in host_refs])
        for ref, slot in zip(host_refs, slots):
            self.tree.move(ref.hash, DEVICE, slot)
            self._events.append(("move", ref.hash, DEVICE))
        self.counters.add("promoted_blocks", len(host_refs))

    def _make_device_room(self, k: int) -> int:
        """Free device slots (spill, else drop) until k are free or nothing unpinned is left.

        Repeats because one pass can stall: once the host tier is full, a device block whose
        children were just spilled is neither a spill victim with host room nor a droppable leaf;
        the next pass drops host leaves to make that room."""
        while self.device_pool.free_count < k:
            before = self.device_pool.free_count
            self._evict_device_once(k)
            if self.device_pool.free_count == before:
                break
        return min(k, self.device_pool.free_count)

    def _evict_device_once(self, k: int) -> None:
        need = k - self.device_pool.free_count
        if need > 0:
            victims = self.tree.victims(DEVICE, need, spill=True)
            # victims come children-first, so any prefix of the list is safe to spill
            victims = victims[: self._make_host_room(len(victims))]
            if victims:
                slots = self.host_pool.alloc(len(victims))
                self.host_pool.write(slots, self.device_pool.read([v.slot for v in victims]))
                self.device_pool.free([v.slot for v in victims])
                for v, slot in zip(victims, slots):
                    self.tree.move(v.hash, HOST, slot)
                    self._events.append(("move", v.hash, HOST))
                self.counters.add("spilled_blocks", len(victims))
        need = k - self.device_pool.free_count
        if need > 0:
            self._drop(DEVICE, self.tree.victims(DEVICE, need, spill=False))

    def _make_host_room(self, k: int) -> int:
        need = k - self.host_pool.free_count
        if need > 0:
            self._drop(HOST, self.tree.victims(HOST, need, spill=False))
        return min(k, self.host_pool.free_count)

    def _drop(self, tier: Tier, victims: list[BlockRef]) -> None:
        if not victims:
            return
        for v in victims:
            self.tree.remove(v.hash)
            self._events.append(("remove", v.hash, tier))
        (self.device_pool if tier == DEVICE else self.host_pool).free([v.slot for v in victims])
        self.counters.add(dropped_blocks(tier), len(victims))


def time_promotion(shape: KVShape, device: torch.device | str, rounds: int = 3) -> float:
    """Seconds to promote one block from the host tier to the device tier on `device`, timed
    through a TieredStore of one device and one host block (the production path: match, pin,
    copy, tree and index bookkeeping); best of `rounds` after a warm-up. A store of its own, so
    the measurement leaves no block and no counter in the caller's cache."""
    device = torch.device(device)
    bb = shape.block_bytes
    store = TieredStore(CacheConfig(block_size=shape.block_size, device_bytes=bb, host_bytes=bb), shape, device)
    h, tokens = BlockHash(bytes(16)), [tuple(range(shape.block_size))]
    store.insert(None, [h], tokens, torch.zeros((1, *shape.block_dims), dtype=shape.dtype))
    best = float("inf")
    for i in range(rounds + 1):
        store.free_working(store.alloc_working(1))  # the device tier is full: the block spills to host
        _sync(device)
        t = time.perf_counter()
        hold = store.acquire([h], tokens)
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - t)
        if hold.host_hits != 1 or hold.blocks[0].tier != DEVICE:
            raise AssertionError(f"promotion not timed: {hold}")
        store.release(hold)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
