"""TieredStore: prefix tree + device pool + host pool + disk tier + eviction + index publishing.

Moves between tiers:
    insert   new blocks go to device; if the device cannot make room (all
             pinned) they go to host; if neither, they are not cached.
    spill    device full -> unpinned device leaves (policy order) move to host;
             when host has no room (all pinned), those with a disk copy move
             straight to the disk tier.
    demote   host full -> unpinned host blocks with no host child move to the
             disk tier (free when they already have a disk copy, else their
             KV is queued for the disk writer; queue full: not demoted).
    drop     host full and nothing demotable -> unpinned host leaves are
             dropped; with no host room, device leaves are dropped instead;
             disk full -> disk copies and disk leaves go, in policy order.
    promote  a host hit moves to device when room can be made; otherwise it
             is served from host (copied to device for the forward pass).
    load     a disk hit is read into host slots (one syscall per run of
             consecutive slots, checksums checked), then promoted like a host
             hit; only when the cost model says reading beats recomputing
             (`set_read_policy`). `prefetch` does it in the caller's thread
             before the request reaches the engine's step loop.
Every move is published to the metadata index in one pipelined write at the
end of the operation that caused it. If the index is down the store keeps
serving and marks itself for a full re-publish (`resync`).

Disk tier (cache_store.disk; on when `CacheConfig.disk_dir` is set): every
block the store caches is also written to disk once, in the background
(write-behind: the disk writer pulls a backlog when its queue is empty), so a
worker that restarts finds its working set there: the tree is rebuilt from
the slot headers at start and re-published under the new generation. Nothing
on the engine's path waits for the disk; a write that cannot be queued is
dropped and counted (`disk_writes_dropped` when that block then leaves memory
unwritten).

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

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch

from cache_store import counter_names as cn
from cache_store.config import CacheConfig
from cache_store.counter_names import (
    EXPORTED_BLOCKS,
    HASH_COLLISIONS,
    INSERT_SKIPPED_BLOCKS,
    INSERTED_BLOCKS,
    PROMOTED_BLOCKS,
    SPILLED_BLOCKS,
    dropped_blocks,
)
from cache_store.counters import Counters
from cache_store.disk import DiskTier, WriteItem, byte_view
from cache_store.errors import ConfigError, IndexUnavailable
from cache_store.hashing import BlockHash
from cache_store.index import MetadataIndex, Op
from cache_store.kv_pool import KVPool, KVShape
from cache_store.policy import make_policy
from cache_store.tree import DEVICE, DISK, HOST, NO_SLOT, BlockRef, PrefixTree, Tier

log = logging.getLogger(__name__)
PUMP_BYTES = 8 << 20  # KV copied out per write-behind batch (under the store lock, on the writer's thread)

Adoption = Literal["adopted", "shared", "refused"]


class Hold(NamedTuple):
    """A pinned cached prefix: the leading blocks of a chain, root first. Release it."""

    blocks: tuple[BlockRef, ...]  # locations after promotion
    device_hits: int  # of these, found on device
    host_hits: int  # found on host or disk (then promoted where room allowed)
    disk_hits: int = 0  # of the host hits, read from the disk tier by this call

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


_NO_TIER = TierStats(0, 0, 0, 0, 0, 0)


class StoreStats(NamedTuple):
    device: TierStats
    host: TierStats
    counters: dict[str, int]
    disk: TierStats = _NO_TIER  # blocks = slots in use (disk-only blocks and disk copies), bytes with headers


class TieredStore:
    def __init__(
        self,
        config: CacheConfig,
        shape: KVShape,
        device: torch.device | str = "cpu",
        *,
        fingerprint: str | None = None,
    ):
        """`fingerprint` (the model's) names whose KV the disk tier's slots hold; needed with a disk_dir."""
        if shape.block_size != config.block_size:
            raise ValueError(f"KV shape block_size {shape.block_size} != config block_size {config.block_size}")
        self.config = config
        self.shape = shape
        self.device = torch.device(device)
        # on CPU the steps write into the device pool: its pages are faulted in here, not mid-step
        self.device_pool = KVPool.from_budget(
            shape, config.device_bytes, self.device, prefault=self.device.type == "cpu"
        )
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
        self._loading = 0  # host slots being filled from disk by `prefetch`, outside the tree
        self._read_pays: Callable[[int], bool] = lambda n: True  # see set_read_policy
        # Blocks to copy to disk when the writer has room (write-behind), oldest first; bounded by
        # the blocks memory holds, as only those can be written.
        self._unsaved: OrderedDict[BlockHash, None] = OrderedDict()
        self.disk: DiskTier | None = None
        if config.disk_dir is not None:
            if not fingerprint:
                raise ConfigError("a disk tier needs the model fingerprint (TieredStore(..., fingerprint=...))")
            self.disk = DiskTier(
                config.disk_dir,
                config.disk_bytes,
                shape,
                fingerprint,
                counters=self.counters,
                queue_bytes=config.disk_queue_bytes,
            )
            if fraction is not None:
                self.tree.set_protected_limit(DISK, int(fraction * self.disk.capacity))
            self._recover()
            self.disk.refill = self._pump
            self._restore_pins()

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
        """Pin the longest verified cached prefix; read its disk part into host (when reading pays,
        see `set_read_policy`) and promote its host part to device where room allows.

        device_only: cut the hold where promotion ran out of room, so every held block is on device
        (what a block table needs). A hold never includes a block left on disk."""
        with self._lock:
            self._reap_disk_failures()
            refs = self._worth_reading(self.tree.match(hashes, blocks))
            if not refs:
                return EMPTY_HOLD
            path = [r.hash for r in refs]
            self.tree.pin(path)
            self.tree.touch(path)
            n_dev = sum(r.tier == DEVICE for r in refs)
            on_disk = [r.hash for r in refs if r.tier == DISK]
            first_disk = len(path) - len(on_disk)
            self._promote([r for r in refs if r.tier == HOST])
            n_disk, corrupt = self._load_through(on_disk) if on_disk else (0, None)
            if n_disk < len(on_disk):  # no room, or a slot failed its checksum: hold what was read
                self.tree.unpin(path[first_disk + n_disk :])
                path = path[: first_disk + n_disk]
                if corrupt is not None:
                    self._discard(corrupt)
            self._publish()
            held = tuple(self.tree.get(h) for h in path)
            if device_only:
                keep = next((i for i, b in enumerate(held) if b.tier != DEVICE), len(held))
                self.tree.unpin(path[keep:])
                held = held[:keep]
            n_disk = max(0, min(n_disk, len(held) - first_disk))
            return Hold(held, min(n_dev, len(held)), max(0, len(held) - n_dev), n_disk)

    def _worth_reading(self, refs: list[BlockRef]) -> list[BlockRef]:
        """(Lock held.) `refs` without their disk part when reading it would be slower than
        recomputing it (the request then prefills those blocks and `adopt` takes them over)."""
        n_disk = sum(r.tier == DISK for r in refs)
        if n_disk and not self._read_pays(n_disk):
            self.counters.add(cn.DISK_READ_SKIPPED, n_disk)
            return refs[: len(refs) - n_disk]
        return refs

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

        "adopted": the slot now belongs to the tree (also when `h` was on disk only, not read because
        recomputing was faster: the block comes back to device in this slot, its disk copy kept).
        "shared": `h` was already cached on device (a concurrent request computed it); that copy is
        pinned instead, so the caller's pinned path stays whole, and the slot stays working.
        "refused": the parent is not a pinned device block or `h` is cached with other tokens or on
        host; the slot stays working, nothing is pinned."""
        with self._lock:
            pnode = self.tree.get(parent) if parent is not None else None
            if parent is not None and (pnode is None or pnode.tier != DEVICE or not self.tree.refs(parent)):
                return "refused"
            if h in self.tree:
                if self.tree.tokens(h) != tuple(tokens) or self.tree.parent(h) != parent:
                    return "refused"
                tier = self.tree.get(h).tier
                if tier == DEVICE:
                    self.tree.pin([h])
                    self.tree.touch([h])
                    return "shared"
                if tier != DISK:
                    return "refused"
                self.tree.move(h, DEVICE, slot)
                self._events.append(("move", h, DEVICE))
            else:
                self.tree.insert(parent, h, tokens, DEVICE, slot)
                self._events.append(("add", h, DEVICE))
                self._remember_unsaved([h])
                self.counters.add(INSERTED_BLOCKS)
            self.tree.pin([h])
            self._working -= 1
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
                    self.counters.add(HASH_COLLISIONS)
                    return start
                prev, start = hashes[start], start + 1
            if start == len(hashes):
                return start
            if prev is not None and prev not in self.tree:
                return start  # the parent was evicted meanwhile: an orphan could never be matched
            if prev is not None and self.tree.get(prev).tier == DISK:
                return start  # memory blocks below a disk block would break the tier order; acquire it first
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
            kv = torch.empty((len(refs), *self.shape.block_dims), dtype=self.shape.dtype)
            refs = refs[: self._read_disk_part(refs, kv)]
            kv = kv[: len(refs)]
            for tier, pool in ((DEVICE, self.device_pool), (HOST, self.host_pool)):
                idx = [i for i, r in enumerate(refs) if r.tier == tier]
                if idx:
                    kv[idx] = pool.read([refs[i].slot for i in idx]).cpu()
            self.counters.add(EXPORTED_BLOCKS, len(refs))
            # a peer is about to hold these too: until the next refresh says otherwise, they are copies
            self.tree.set_copies({r.hash: 2 for r in refs})
            return Exported([r.hash for r in refs], [self.tree.tokens(r.hash) for r in refs], kv)

    # ---- disk tier --------------------------------------------------------

    def set_read_policy(self, pays: Callable[[int], bool]) -> None:
        """`pays(n)`: whether reading n blocks from disk beats recomputing them (the engine passes its
        measured cost model). Until set, every disk hit is read."""
        self._read_pays = pays

    def time_disk_read(self) -> dict[str, float]:
        """The disk tier's measured read cost as cost-model terms (worker.costs.CostModel), or {}
        without a disk tier. Cold reads: see DiskTier.time_read."""
        if self.disk is None:
            return {}
        per_block, overhead = self.disk.time_read()
        return {"disk_read_s_per_block": per_block, "disk_read_overhead_s": overhead}

    def prefetch(self, hashes: Sequence[BlockHash], blocks: Sequence[Sequence[int]]) -> int:
        """Read the disk part of this prompt's cached prefix into the host tier now, in the calling
        thread, with the store lock released during the read (the engine's steps go on); the
        request's `acquire` then finds it on host. Returns blocks read. Only when reading pays."""
        if self.disk is None:
            return 0
        with self._lock:
            self._reap_disk_failures()
            refs = self.tree.match(hashes, blocks)
            on_disk = [r.hash for r in refs if r.tier == DISK]
            if not on_disk or not self._read_pays(len(on_disk)):
                return 0
            path = [r.hash for r in refs]
            self.tree.pin(path)  # the disk slots stay put while the lock is released
            n = self._make_host_room(len(on_disk))
            take, host_slots = on_disk[:n], self.host_pool.alloc(n)
            disk_slots = [self.tree.disk_slot(h) for h in take]
            self._loading += n
        ok: list[bool] = []
        try:
            ok = self.disk.read_into(disk_slots, take, [byte_view(self.host_pool.data[s]) for s in host_slots])
        finally:
            with self._lock:
                self._loading -= n
                moved = self._place_loaded(take, disk_slots, host_slots, ok)
                self.tree.unpin(path)
                if len(ok) > moved and not ok[moved]:
                    self._discard(take[moved])
                self._publish()
        return moved

    def _place_loaded(self, take, disk_slots, host_slots, ok) -> int:
        """(Lock held.) Move blocks read from disk into their host slots, root side first, while each
        read checked out and the block is still where it was read from; free the other slots."""
        moved = 0
        for i, (h, ds, hs) in enumerate(zip(take, disk_slots, host_slots)):
            ref = self.tree.get(h)
            if i == moved and i < len(ok) and ok[i] and ref is not None and ref.tier == DISK and ref.slot == ds:
                self.tree.move(h, HOST, hs)
                self._events.append(("move", h, HOST))
                moved += 1
            else:
                self.host_pool.free([hs])
        return moved

    def _load_through(self, on_disk: list[BlockHash]) -> tuple[int, BlockHash | None]:
        """(Lock held, path pinned, the part above it promoted.) Read disk blocks into host and
        promote them to device a host tier's worth at a time, so a disk hit longer than the host
        tier is read whole; returns (blocks read, the first corrupt block or None)."""
        done, corrupt = 0, None
        while done < len(on_disk) and corrupt is None:
            n, corrupt = self._load(on_disk[done:])
            if n == 0:
                break
            parent = self.tree.parent(on_disk[done])
            if parent is None or self.tree.get(parent).tier == DEVICE:
                self._promote([self.tree.get(h) for h in on_disk[done : done + n]])
            done += n
            if self.tree.get(on_disk[done - 1]).tier != DEVICE:
                break  # the device tier is full: what was read stays on host
        return done, corrupt

    def _load(self, on_disk: list[BlockHash]) -> tuple[int, BlockHash | None]:
        """(Lock held, path pinned.) Read disk blocks (a chain, root side first) into host slots;
        returns (blocks moved to host, the first block whose slot failed its checksum or None)."""
        n = self._make_host_room(len(on_disk))
        take, host_slots = on_disk[:n], self.host_pool.alloc(n)
        disk_slots = [self.tree.disk_slot(h) for h in take]
        ok = self.disk.read_into(disk_slots, take, [byte_view(self.host_pool.data[s]) for s in host_slots])
        moved = self._place_loaded(take, disk_slots, host_slots, ok)
        return moved, (take[moved] if moved < len(take) and not ok[moved] else None)

    def _read_disk_part(self, refs: list[BlockRef], kv: torch.Tensor) -> int:
        """(Lock held.) Fill kv[i] for the disk-tier refs (export); returns how many leading refs are
        usable (cut at the first slot that fails its checksum)."""
        idx = [i for i, r in enumerate(refs) if r.tier == DISK]
        if not idx:
            return len(refs)
        ok = self.disk.read_into(
            [refs[i].slot for i in idx], [refs[i].hash for i in idx], [byte_view(kv[i]) for i in idx]
        )
        bad = next((k for k, good in enumerate(ok) if not good), None)
        if bad is None:
            return len(refs)
        if not self.tree.refs(refs[idx[bad]].hash):
            self._discard(refs[idx[bad]].hash)
        return idx[bad]

    def _discard(self, h: BlockHash) -> bool:
        """(Lock held.) Remove a disk block whose slot cannot be served (failed checksum or write),
        with every block below it (all on disk); False, leaving them, if any is pinned (whoever
        holds it reads it and finds the same). The next request recomputes and re-caches them."""
        below = self.tree.subtree(h)
        if any(self.tree.refs(x) for x in below):
            return False
        for x in below:
            slot = self.tree.disk_slot(x)
            self.tree.remove(x)
            self._events.append(("remove", x, DISK))
            self.disk.free([slot])
        return True

    def _reap_disk_failures(self) -> None:
        """(Lock held.) Forget the disk copies whose write failed; their slots go back to the pool."""
        if self.disk is None:
            return
        for slot, h in self.disk.take_failures():
            if h in self.tree and self.tree.disk_slot(h) == slot:
                if self.tree.get(h).tier != DISK:
                    self.tree.set_disk_slot(h, NO_SLOT)
                elif not self._discard(h):
                    self.disk.retry_failure(slot, h)  # pinned now: try again at the next call
                    continue
                else:
                    continue  # _discard freed the slot
            self.disk.free([slot])

    def _remember_unsaved(self, hashes: Sequence[BlockHash], *, first: bool = False) -> None:
        """(Lock held.) Blocks to write behind; `first`: before everything queued (pinned prefixes)."""
        if self.disk is None:
            return
        unsaved = self._unsaved
        for h in hashes:
            unsaved[h] = None
            if first:
                unsaved.move_to_end(h, last=False)
        limit = self.device_pool.capacity + self.host_pool.capacity
        while len(unsaved) > limit:
            unsaved.popitem(last=False)
        self.disk.wake()

    def _pump(self) -> None:
        """The disk writer's refill (its thread): copy the next unsaved blocks out of memory into a
        write batch, as many as the writer's queue takes, making disk room in policy order."""
        if not self._unsaved:
            return
        with self._lock:
            self._reap_disk_failures()
            limit = min(self.disk.queue_room(), max(1, PUMP_BYTES // self.shape.block_bytes))
            todo: list[BlockRef] = []
            while self._unsaved and len(todo) < limit:
                h, _ = self._unsaved.popitem(last=False)
                ref = self.tree.get(h)
                if ref is not None and ref.tier != DISK and self.tree.disk_slot(h) == NO_SLOT:
                    todo.append(ref)
            if todo:
                self._write_copies(todo)

    def _write_copies(self, refs: list[BlockRef]) -> int:
        """(Lock held.) Queue disk copies of device/host blocks; returns how many were queued (the
        rest: no disk room or no queue room)."""
        self._make_disk_room(len(refs))
        slots = self.disk.alloc(len(refs))
        refs = refs[: len(slots)]
        if not refs:
            return 0
        kv = torch.empty((len(refs), *self.shape.block_dims), dtype=self.shape.dtype)
        for tier, pool in ((DEVICE, self.device_pool), (HOST, self.host_pool)):
            idx = [i for i, r in enumerate(refs) if r.tier == tier]
            if idx:
                kv[idx] = pool.read([refs[i].slot for i in idx]).cpu()
        items = [
            WriteItem(slot, r.hash, self.tree.parent(r.hash), self.tree.tokens(r.hash), kv[i])
            for i, (r, slot) in enumerate(zip(refs, slots))
        ]
        taken = self.disk.submit(items)
        for r, slot in zip(refs[:taken], slots):
            self.tree.set_disk_slot(r.hash, slot)
        if taken < len(slots):
            self.disk.free(slots[taken:])
        return taken

    def _demote_host(self, victims: list[BlockRef]) -> None:
        """(Lock held.) Move host victims (children first) to the disk tier: free for those with a
        disk copy, a queued write for the rest while the writer takes them. A block that cannot
        go (and so its host ancestors) stays."""
        need_write = [v for v in victims if self.tree.disk_slot(v.hash) == NO_SLOT]
        if need_write:
            self._write_copies(need_write)
        for v in victims:
            if self.tree.disk_slot(v.hash) == NO_SLOT or not self.tree.can_demote(v.hash, DISK):
                continue  # not written, or a child stayed on host
            self.tree.move(v.hash, DISK, self.tree.disk_slot(v.hash))
            self.host_pool.free([v.slot])
            self._events.append(("move", v.hash, DISK))
            self.counters.add(SPILLED_BLOCKS)

    def _make_disk_room(self, k: int) -> int:
        """(Lock held.) Free disk slots (disk copies, then disk leaves, in policy order) until k are
        free or nothing unpinned is left. A slot whose write is in flight frees when it lands."""
        disk = self.disk
        while disk.free_count < k:
            victims = self.tree.disk_victims(k - disk.free_count)
            if not victims:
                break
            for v in victims:
                slot = self.tree.disk_slot(v.hash)
                if v.tier == DISK:
                    self.tree.remove(v.hash)
                    self._events.append(("remove", v.hash, DISK))
                    self.counters.add(dropped_blocks(DISK))
                else:
                    self.tree.set_disk_slot(v.hash, NO_SLOT)
                disk.free([slot])
        return min(k, disk.free_count)

    def _recover(self) -> None:
        """Rebuild the tree from the disk tier's slot headers (payloads are checked when read). A
        block whose chain does not reach a first block on disk could never be matched: its slot
        is freed."""
        headers = {h.hash: h for h in self.disk.recover()}
        usable: dict[BlockHash, bool] = {}
        orphans: list[int] = []
        for head in sorted(headers.values(), key=lambda x: x.seq):
            chain, seen, cur = [], set(), head
            while True:  # up to a block already judged, a first block, or a missing (or looping) parent
                if cur.hash in usable:
                    ok = usable[cur.hash]
                    break
                chain.append(cur)
                seen.add(cur.hash)
                if cur.parent is None:
                    ok = True
                    break
                cur = headers.get(cur.parent)
                if cur is None or cur.hash in seen:
                    ok = False
                    break
            for node in reversed(chain):  # parents first
                usable[node.hash] = ok
                if ok:
                    self.tree.insert(node.parent, node.hash, node.tokens, DISK, node.slot)
                else:
                    orphans.append(node.slot)
        if orphans:
            self.disk.free(orphans)
        self.counters.add(cn.DISK_RECOVERED_BLOCKS, len(headers) - len(orphans))
        self.counters.add(cn.DISK_IGNORED_SLOTS, len(orphans))

    def flush_disk(self, timeout_s: float = 10.0) -> bool:
        """Wait until every block in memory has its disk copy written (True), or `timeout_s` passed
        (False: the writer is behind, or the disk has no room the policy can free)."""
        if self.disk is None:
            return True
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:  # the pump moves blocks from the backlog to the queue under this lock
                if not self._unsaved and self.disk.idle():
                    return True
            if time.monotonic() >= deadline:
                return False
            self.disk.wake()
            time.sleep(0.002)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is not on disk yet (up to `timeout_s`), then release the disk directory. A
        worker killed instead loses only the blocks whose copies were not written yet."""
        if self.disk is not None:
            self.flush_disk(timeout_s)
            self.disk.close(timeout_s)

    # ---- operator controls -------------------------------------------------

    def pin_prefix(self, hashes: Sequence[BlockHash], blocks: Sequence[Sequence[int]]) -> int:
        """Pin a cached prefix until `unpin_prefix` (e.g. a system prompt that must stay). Returns blocks pinned."""
        hold = self.acquire(hashes, blocks)
        if hold.blocks:
            with self._lock:
                self._user_pins.setdefault(hold.blocks[-1].hash, []).append(hold)
                self._remember_unsaved(hold.hashes, first=True)  # a pinned prefix goes to disk next
                self._save_pins()
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
                    self._save_pins()
                    return h
            return None

    def pinned_prefixes(self) -> list[BlockHash]:
        """The last block of each prefix `pin_prefix` holds."""
        with self._lock:
            return list(self._user_pins)

    def _save_pins(self) -> None:
        """(Lock held.) Keep the pins with the disk tier, so a restart pins them again."""
        if self.disk is None:
            return
        try:
            self.disk.save_pins([(h, len(holds)) for h, holds in self._user_pins.items()])
        except OSError as e:  # the pin holds in memory; only its survival of a restart is lost
            log.warning("pins not saved to the disk tier (%s): a restart will not pin them again", e)

    def _restore_pins(self) -> None:
        """Pin again the saved pins whose blocks were recovered (read into memory, as a pin keeps
        them); a pin whose blocks are gone is forgotten."""
        for h, times in self.disk.load_pins():
            if h not in self.tree:
                continue
            path = self.tree.path(h)
            blocks = [self.tree.tokens(x) for x in path]
            for _ in range(times):
                if self.pin_prefix(path, blocks) < len(path):
                    break  # no room in memory for the whole prefix: what fit stays pinned
        with self._lock:
            self._save_pins()
        self.counters.add(cn.DISK_RESTORED_PINS, sum(len(v) for v in self._user_pins.values()))

    def clear(self) -> int:
        """Drop every cached block nothing pins, in every tier, disk copies and disk-only blocks
        too (benchmarks start cold with it; a running request's blocks and `pin_prefix` pins stay,
        with their disk copies). Returns blocks dropped."""
        with self._lock:
            before = len(self.tree)
            on_disk = set()
            if self.disk is not None:
                self.disk.flush()  # no write in flight (the pump waits for this lock): freed slots are free
                on_disk = {self.tree.disk_slot(r.hash) for r in self.tree.blocks()} - {NO_SLOT}
            while True:
                if self.disk is not None:  # disk copies first: the memory blocks then go, not to disk
                    self._make_disk_room(self.disk.capacity)
                victims = {tier: self.tree.victims(tier, len(self.tree), spill=False) for tier in (HOST, DEVICE)}
                if not any(victims.values()):
                    break
                for tier, refs in victims.items():
                    self._drop(tier, refs, lost_writes=False)
            self._unsaved = OrderedDict((h, None) for h in self._unsaved if h in self.tree)
            if self.disk is not None:
                kept = {self.tree.disk_slot(r.hash) for r in self.tree.blocks()}
                self.disk.erase(sorted(on_disk - kept))
            self._publish()
            return before - len(self.tree)

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
            return StoreStats(tiers[0], tiers[1], self.counters.snapshot(), self._disk_stats(t))

    def _disk_stats(self, t) -> TierStats:
        if self.disk is None:
            return _NO_TIER
        d = self.disk.stats()
        return TierStats(d.slots, d.capacity, t.pinned[DISK], d.slots - t.pinned[DISK], d.bytes_used, d.bytes_capacity)

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree and the pools disagree on what is used (tests call it)."""
        with self._lock:
            t = self.tree.stats()
            for tier, pool in ((DEVICE, self.device_pool), (HOST, self.host_pool)):
                working = self._working if tier == DEVICE else self._loading
                assert pool.used_count == t.blocks[tier] + working, (
                    f"{tier}: pool uses {pool.used_count}, tree has {t.blocks[tier]}, working {working}"
                )
                assert pool.used_count <= pool.capacity
                assert t.pinned[tier] + t.evictable[tier] == t.blocks[tier]
            if self.disk is not None:
                used, zombies = self.disk.used_count, self.disk.zombie_count()
                assert used == self.tree.disk_slots + zombies, (
                    f"disk: {used} slots used, tree has {self.tree.disk_slots} disk slots, {zombies} freeing"
                )
                assert used <= self.disk.capacity and t.blocks[DISK] <= self.tree.disk_slots
            else:
                assert t.blocks[DISK] == 0

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
            self._remember_unsaved(hashes[lo:hi])
        self.counters.add(INSERTED_BLOCKS, n_dev + n_host)
        self.counters.add(INSERT_SKIPPED_BLOCKS, k - n_dev - n_host)
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
        self.counters.add(PROMOTED_BLOCKS, len(host_refs))

    def _make_device_room(self, k: int) -> int:
        """Free device slots (spill to host, or to disk where a copy is, else drop) until k are free
        or nothing unpinned is left.

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
            candidates = self.tree.victims(DEVICE, need, spill=True)
            # victims come children-first, so any prefix of the list is safe to spill
            room = self._make_host_room(len(candidates))
            victims, rest = candidates[:room], candidates[room:]
            if rest and self.disk is not None:  # host all pinned: blocks with a disk copy skip it
                self._drop(DEVICE, [v for v in rest if self.tree.disk_slot(v.hash) != NO_SLOT])
            if victims:
                slots = self.host_pool.alloc(len(victims))
                self.host_pool.write(slots, self.device_pool.read([v.slot for v in victims]))
                self.device_pool.free([v.slot for v in victims])
                for v, slot in zip(victims, slots):
                    self.tree.move(v.hash, HOST, slot)
                    self._events.append(("move", v.hash, HOST))
                self.counters.add(SPILLED_BLOCKS, len(victims))
        need = k - self.device_pool.free_count
        if need > 0:
            self._drop(DEVICE, self.tree.victims(DEVICE, need, spill=False))

    def _make_host_room(self, k: int) -> int:
        need = k - self.host_pool.free_count
        if need > 0 and self.disk is not None:
            self._demote_host(self.tree.victims(HOST, need, spill=True))
            need = k - self.host_pool.free_count
        if need > 0:
            self._drop(HOST, self.tree.victims(HOST, need, spill=False))
        return min(k, self.host_pool.free_count)

    def _drop(self, tier: Tier, victims: list[BlockRef], *, lost_writes: bool = True) -> None:
        """Leaves (children first) leave `tier`: to the disk tier when they have a disk copy (no
        write needed), else out of the cache (`lost_writes`: counted as writes the disk missed)."""
        if not victims:
            return
        gone, to_disk = [], 0
        for v in victims:
            slot = self.tree.disk_slot(v.hash)
            if slot != NO_SLOT and self.tree.can_demote(v.hash, DISK):
                self.tree.move(v.hash, DISK, slot)
                self._events.append(("move", v.hash, DISK))
                to_disk += 1
            elif self.tree.has_children(v.hash):
                continue  # a child moved to disk instead of going: this block must stay
            else:
                self.tree.remove(v.hash)
                self._events.append(("remove", v.hash, tier))
            gone.append(v.slot)
        (self.device_pool if tier == DEVICE else self.host_pool).free(gone)
        self.counters.add(dropped_blocks(tier), len(gone) - to_disk)
        self.counters.add(SPILLED_BLOCKS, to_disk)
        if self.disk is not None and lost_writes:  # the writer was behind (or the disk all pinned)
            self.counters.add(cn.DISK_WRITES_DROPPED, len(gone) - to_disk)


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
