"""The prefix tree: which blocks this worker holds, where, and which may go.

Nodes are keyed by chained `BlockHash`, so a lookup is one dict probe per
block; the parent/child links exist for eviction, which must only take
leaves (evicting an inner block would strand every block below it, since a
prefix is only usable from the root down).

Tier invariant: the device tier is closed upward (a device node's parent is
on device). Hits are used from the root down, so this keeps the device part
of every cached prefix a leading run; it is kept by spilling only "device
leaves" (no child on device) and promoting whole paths.

Ref-count rule: callers pin whole paths from the root (`pin(path)`), so a
pinned node's ancestors are pinned too. Pinned nodes are never offered as
victims, never moved by eviction and never removed.

Not thread-safe; `TieredStore` serializes access under its lock.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

from cache_store.hashing import BlockHash
from cache_store.policy import EvictionPolicy

Tier = Literal["device", "host"]
DEVICE: Tier = "device"
HOST: Tier = "host"


class BlockRef(NamedTuple):
    """Where one cached block lives. Callers get these, never tree nodes."""

    hash: BlockHash
    tier: Tier
    slot: int


class TreeStats(NamedTuple):
    blocks: dict[str, int]  # per tier
    pinned: dict[str, int]  # per tier, refs > 0
    evictable: dict[str, int]  # per tier, refs == 0; pinned + evictable == blocks


class _Node:
    __slots__ = (
        "hash",
        "parent",
        "children",
        "tokens",
        "tier",
        "slot",
        "refs",
        "last_access",
        "hits",
        "priority",
        "device_children",
        "depth",
        "copies",
        "protected",
    )

    def __init__(self, hash_, parent, tokens, tier, slot, clock):
        self.hash: BlockHash = hash_
        self.parent: _Node | None = parent
        self.children: dict[BlockHash, _Node] = {}
        self.tokens: tuple[int, ...] = tokens
        self.tier: Tier = tier
        self.slot: int = slot
        self.refs = 0
        self.last_access = clock
        self.hits = 0
        self.priority = 0
        self.device_children = 0
        self.depth = 0 if parent is None else parent.depth + 1
        self.copies = 1  # workers holding this block cluster-wide, as last read from the index (1: unknown)
        self.protected = False  # in its tier's protected segment (reused, and among the newest reused)

    def ref(self) -> BlockRef:
        return BlockRef(self.hash, self.tier, self.slot)


class PrefixTree:
    """Nodes keyed by BlockHash with parent, children, tier, slot, tokens, refs.

    `match` verifies the stored token ids of every block it returns: a hash
    collision (same hash, other tokens) ends the match there, as a miss.
    """

    def __init__(self, policy: EvictionPolicy):
        self.policy = policy
        self._nodes: dict[BlockHash, _Node] = {}
        self._clock = 0
        # Victim candidates, kept current on every change so eviction never
        # scans the whole tree: spill = device, no device child, unpinned;
        # drop = no child at all, unpinned (per tier).
        self._spill: set[BlockHash] = set()
        self._drop: dict[Tier, set[BlockHash]] = {DEVICE: set(), HOST: set()}
        self._pinned: dict[Tier, int] = {DEVICE: 0, HOST: 0}
        self._count: dict[Tier, int] = {DEVICE: 0, HOST: 0}
        # Protected segment per tier (bounded SLRU): reused blocks, least recently used first; past
        # the limit the oldest is demoted to probation. None: unbounded (every reused block stays).
        self._protected: dict[Tier, OrderedDict[BlockHash, None]] = {DEVICE: OrderedDict(), HOST: OrderedDict()}
        self._protected_limit: dict[Tier, int | None] = {DEVICE: None, HOST: None}

    # ---- queries -------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, h: object) -> bool:
        return h in self._nodes

    def get(self, h: BlockHash) -> BlockRef | None:
        node = self._nodes.get(h)
        return None if node is None else node.ref()

    def tokens(self, h: BlockHash) -> tuple[int, ...]:
        return self._nodes[h].tokens

    def match(self, hashes: Sequence[BlockHash], blocks: Sequence[Sequence[int]]) -> list[BlockRef]:
        """Longest leading run of `hashes` held here, each block's tokens verified."""
        out: list[BlockRef] = []
        parent: _Node | None = None
        for h, toks in zip(hashes, blocks):
            node = self._nodes.get(h)
            if node is None or node.parent is not parent or node.tokens != tuple(toks):
                break
            out.append(node.ref())
            parent = node
        return out

    def blocks(self) -> Iterator[BlockRef]:
        """Every block, parents before children."""
        for node in sorted(self._nodes.values(), key=lambda n: n.depth):
            yield node.ref()

    def path(self, h: BlockHash) -> list[BlockHash]:
        """Hashes from the first block down to `h`."""
        out = []
        node: _Node | None = self._nodes[h]
        while node is not None:
            out.append(node.hash)
            node = node.parent
        return out[::-1]

    def refs(self, h: BlockHash) -> int:
        return self._nodes[h].refs

    def stats(self) -> TreeStats:
        blocks = dict(self._count)
        pinned = dict(self._pinned)
        evictable = {t: blocks[t] - pinned[t] for t in blocks}
        return TreeStats(blocks, pinned, evictable)

    # ---- updates -------------------------------------------------------

    def insert(self, parent: BlockHash | None, h: BlockHash, tokens: Sequence[int], tier: Tier, slot: int) -> None:
        """Add block `h` below `parent` (None: a first block). `h` must be new."""
        if h in self._nodes:
            raise KeyError(f"block {h.hex()} is already in the tree")
        pnode = None if parent is None else self._nodes[parent]
        if tier == DEVICE and pnode is not None and pnode.tier != DEVICE:
            raise ValueError("a device block's parent must be on device (tier invariant)")
        self._clock += 1
        node = _Node(h, pnode, tuple(tokens), tier, slot, self._clock)
        self._nodes[h] = node
        self._count[tier] += 1
        if pnode is not None:
            pnode.children[h] = node
            if tier == DEVICE:
                pnode.device_children += 1
        self._refresh(node, pnode)

    def touch(self, hashes: Iterable[BlockHash]) -> None:
        """Record a use of these blocks (one clock tick for the whole path); a reuse protects them."""
        self._clock += 1
        for h in hashes:
            node = self._nodes[h]
            node.last_access = self._clock
            node.hits += 1
            self._protect(node)
        for tier in (DEVICE, HOST):
            self._demote_excess(tier)

    def set_protected_limit(self, tier: Tier, limit: int | None) -> None:
        """Cap the protected segment of `tier` at `limit` blocks (None: unbounded)."""
        self._protected_limit[tier] = limit
        self._demote_excess(tier)

    def protected_count(self, tier: Tier) -> int:
        return len(self._protected[tier])

    def _protect(self, node: _Node) -> None:
        seg = self._protected[node.tier]
        seg[node.hash] = None
        seg.move_to_end(node.hash)
        node.protected = True

    def _unprotect(self, node: _Node) -> None:
        if node.protected:
            self._protected[node.tier].pop(node.hash, None)
            node.protected = False

    def _demote_excess(self, tier: Tier) -> None:
        """Oldest protected blocks back to probation until the segment fits its limit."""
        limit, seg = self._protected_limit[tier], self._protected[tier]
        while limit is not None and len(seg) > limit:
            h, _ = seg.popitem(last=False)
            self._nodes[h].protected = False

    def set_priority(self, hashes: Iterable[BlockHash], priority: int) -> None:
        for h in hashes:
            self._nodes[h].priority = priority

    def set_copies(self, counts: Mapping[BlockHash, int]) -> None:
        """Record how many workers hold each block (a batched read of the index; absent hashes are skipped)."""
        for h, n in counts.items():
            node = self._nodes.get(h)
            if node is not None:
                node.copies = max(1, n)

    def candidates(self) -> list[BlockHash]:
        """Blocks that could be chosen by the next eviction (unpinned leaves of either kind)."""
        return list(self._spill.union(self._drop[DEVICE], self._drop[HOST]))

    def pin(self, hashes: Iterable[BlockHash]) -> None:
        for h in hashes:
            node = self._nodes[h]
            node.refs += 1
            if node.refs == 1:
                self._pinned[node.tier] += 1
                self._refresh(node)

    def unpin(self, hashes: Iterable[BlockHash]) -> None:
        for h in hashes:
            node = self._nodes[h]
            if node.refs <= 0:
                raise RuntimeError(f"unpin of block {h.hex()} that is not pinned (ref-count bug)")
            node.refs -= 1
            if node.refs == 0:
                self._pinned[node.tier] -= 1
                self._refresh(node)

    def move(self, h: BlockHash, tier: Tier, slot: int) -> None:
        """Change a block's tier/slot, keeping the device tier closed upward."""
        node = self._nodes[h]
        if tier == DEVICE and node.parent is not None and node.parent.tier != DEVICE:
            raise ValueError("promote the parent first: a device block's parent must be on device")
        if tier == HOST and node.device_children:
            raise ValueError("spill the children first: a device block's parent must be on device")
        if tier != node.tier:
            was_protected = node.protected
            self._unprotect(node)
            self._count[node.tier] -= 1
            self._count[tier] += 1
            if node.refs:
                self._pinned[node.tier] -= 1
                self._pinned[tier] += 1
            if node.parent is not None:
                node.parent.device_children += 1 if tier == DEVICE else -1
            node.tier = tier
            if was_protected:
                self._protect(node)
                self._demote_excess(tier)
        node.tier, node.slot = tier, slot
        self._refresh(node, node.parent)

    def remove(self, h: BlockHash) -> BlockRef:
        """Drop an unpinned leaf."""
        node = self._nodes[h]
        if node.children or node.refs:
            raise ValueError(f"block {h.hex()} is pinned or has children; only unpinned leaves are removed")
        self._unprotect(node)
        del self._nodes[h]
        self._count[node.tier] -= 1
        self._spill.discard(h)
        self._drop[node.tier].discard(h)
        parent = node.parent
        if parent is not None:
            del parent.children[h]
            if node.tier == DEVICE:
                parent.device_children -= 1
            self._refresh(parent)
        return node.ref()

    # ---- eviction ------------------------------------------------------

    def victims(self, tier: Tier, n: int, *, spill: bool) -> list[BlockRef]:
        """Up to `n` blocks of `tier` to evict, in policy order, children before parents.

        spill=True (device only): blocks with no device child, to move to the
        host tier. spill=False: blocks with no child at all, to drop. The
        choice is simulated ahead, so a parent whose last child is picked
        becomes a candidate in the same call. Nothing is changed here.
        """
        if spill and tier != DEVICE:
            raise ValueError("only device blocks are spilled")
        pool = self._spill if spill else self._drop[tier]
        heap = [self._heap_item(self._nodes[h]) for h in pool]
        heapq.heapify(heap)
        taken: dict[BlockHash, int] = {}  # parent hash -> children taken so far
        out: list[BlockRef] = []
        while heap and len(out) < n:
            node = heapq.heappop(heap)[-1]
            out.append(node.ref())
            parent = node.parent
            if parent is None or parent.refs or parent.tier != tier:
                continue
            taken[parent.hash] = taken.get(parent.hash, 0) + 1
            remaining = (parent.device_children if spill else len(parent.children)) - taken[parent.hash]
            if remaining == 0:
                heapq.heappush(heap, self._heap_item(parent))
        return out

    def _heap_item(self, node: _Node) -> tuple:
        return (self.policy.key(node), -node.depth, node.hash, node)

    def _refresh(self, *nodes: _Node | None) -> None:
        """Recompute victim-candidate membership of these nodes."""
        for node in nodes:
            if node is None or node.hash not in self._nodes:
                continue
            free = node.refs == 0
            _set_member(self._spill, node.hash, free and node.tier == DEVICE and node.device_children == 0)
            leaf = free and not node.children
            _set_member(self._drop[DEVICE], node.hash, leaf and node.tier == DEVICE)
            _set_member(self._drop[HOST], node.hash, leaf and node.tier == HOST)


def _set_member(s: set, key, present: bool) -> None:
    if present:
        s.add(key)
    else:
        s.discard(key)
