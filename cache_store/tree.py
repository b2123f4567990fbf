"""The prefix tree: which blocks this worker holds, where, and which may go.

Nodes are keyed by chained `BlockHash`, so a lookup is one dict probe per
block; the parent/child links exist for eviction, which must only take
leaves (evicting an inner block would strand every block below it, since a
prefix is only usable from the root down).

Tier invariant: tiers are ordered device < host < disk, and a node is never
in a faster tier than its parent (a device node's parent is on device, a
host node's on device or host). Hits are used from the root down, so the
device part of every cached prefix is a leading run, then the host part,
then the disk part; it is kept by demoting only nodes with no child in their
own tier (`victims(spill=True)`) and promoting whole paths, root side first.

Disk copies: with a disk tier, a block in any tier may also have a copy in a
disk slot (`disk_slot`, -1 for none): the write-behind copy of a device or
host block, or the slot a disk-tier block lives in. Demoting a block that has
a copy costs no write; losing a copy of a faster-tier block costs nothing
but the copy. `disk_victims` offers both kinds in policy order.

Ref-count rule: callers pin whole paths from the root (`pin(path)`), so a
pinned node's ancestors are pinned too. Pinned nodes are never offered as
victims, never moved by eviction and never removed.

Not thread-safe; `TieredStore` serializes access under its lock.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple, get_args

from cache_store.counter_names import DEVICE, DISK, HOST
from cache_store.hashing import BlockHash
from cache_store.policy import EvictionPolicy

Tier = Literal["device", "host", "disk"]  # the names are counter_names' (checked below)
TIERS: tuple[Tier, ...] = (DEVICE, HOST, DISK)
assert get_args(Tier) == TIERS, "cache_store.tree.Tier must list counter_names' tiers, in rank order"
_RANK = {DEVICE: 0, HOST: 1, DISK: 2}  # a child's rank is never below its parent's
NO_SLOT = -1


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
        "device_children",
        "host_children",
        "disk_slot",
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
        self.device_children = 0
        self.host_children = 0
        self.disk_slot = NO_SLOT  # a disk copy (or, on the disk tier, the slot itself)
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
        # scans the whole tree: spill = unpinned, no child in its own tier (device
        # and host: to demote a tier down); drop = no child at all, unpinned (per
        # tier); disk = unpinned with a disk copy that can go (a copy of a faster
        # block, or a disk-tier leaf).
        self._spill: dict[Tier, set[BlockHash]] = {DEVICE: set(), HOST: set()}
        self._drop: dict[Tier, set[BlockHash]] = {t: set() for t in TIERS}
        self._disk: set[BlockHash] = set()
        self._pinned: dict[Tier, int] = dict.fromkeys(TIERS, 0)
        self._count: dict[Tier, int] = dict.fromkeys(TIERS, 0)
        self._disk_copies = 0  # nodes with a disk slot, any tier
        # Protected segment per tier (bounded SLRU): reused blocks, least recently used first; past
        # the limit the oldest is demoted to probation. None: unbounded (every reused block stays).
        self._protected: dict[Tier, OrderedDict[BlockHash, None]] = {t: OrderedDict() for t in TIERS}
        self._protected_limit: dict[Tier, int | None] = dict.fromkeys(TIERS, None)

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

    def disk_slot(self, h: BlockHash) -> int:
        """The block's disk slot (NO_SLOT: no copy on disk)."""
        return self._nodes[h].disk_slot

    def parent(self, h: BlockHash) -> BlockHash | None:
        node = self._nodes[h].parent
        return None if node is None else node.hash

    def has_children(self, h: BlockHash) -> bool:
        return bool(self._nodes[h].children)

    def can_demote(self, h: BlockHash, tier: Tier) -> bool:
        """Whether `move(h, tier)` keeps the tier order below `h` (no child in a faster tier)."""
        node = self._nodes[h]
        return all(_RANK[c.tier] >= _RANK[tier] for c in node.children.values())

    @property
    def disk_slots(self) -> int:
        """Blocks with a disk slot (disk-tier blocks and copies of faster ones)."""
        return self._disk_copies

    def subtree(self, h: BlockHash) -> list[BlockHash]:
        """`h` and every block below it, children before parents (an order `remove` accepts)."""
        out: list[BlockHash] = []
        stack = [self._nodes[h]]
        while stack:
            node = stack.pop()
            out.append(node.hash)
            stack.extend(node.children.values())
        return out[::-1]

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
        if pnode is not None and _RANK[tier] < _RANK[pnode.tier]:
            faster = " or ".join(t for t in TIERS if _RANK[t] <= _RANK[tier])
            raise ValueError(f"a {tier} block's parent must be on {faster} (tier invariant), not {pnode.tier}")
        self._clock += 1
        node = _Node(h, pnode, tuple(tokens), tier, slot, self._clock)
        self._nodes[h] = node
        self._count[tier] += 1
        if tier == DISK:
            node.disk_slot = slot
            self._disk_copies += 1
        if pnode is not None:
            pnode.children[h] = node
            _count_child(pnode, tier, +1)
        self._refresh(node, pnode)

    def touch(self, hashes: Iterable[BlockHash]) -> None:
        """Record a use of these blocks (one clock tick for the whole path); a reuse protects them."""
        self._clock += 1
        for h in hashes:
            node = self._nodes[h]
            node.last_access = self._clock
            node.hits += 1
            self._protect(node)
        for tier in TIERS:
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

    def set_copies(self, counts: Mapping[BlockHash, int]) -> None:
        """Record how many workers hold each block (a batched read of the index; absent hashes are skipped)."""
        for h, n in counts.items():
            node = self._nodes.get(h)
            if node is not None:
                node.copies = max(1, n)

    def candidates(self) -> list[BlockHash]:
        """Blocks that could be chosen by the next eviction (unpinned leaves of any kind)."""
        return list(set().union(*self._spill.values(), *self._drop.values()))

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
        """Change a block's tier/slot, keeping the tier order (no node faster than its parent).
        To the disk tier, `slot` is its disk slot; from it, the disk slot stays as a copy."""
        node = self._nodes[h]
        if node.parent is not None and _RANK[tier] < _RANK[node.parent.tier]:
            raise ValueError(f"promote the parent first: it is on {node.parent.tier}, this block would be on {tier}")
        if (tier != DEVICE and node.device_children) or (tier == DISK and node.host_children):
            raise ValueError(f"spill the children first: a child would be in a faster tier than {tier}")
        if tier == DISK and node.disk_slot not in (NO_SLOT, slot):
            raise ValueError("a block has one disk slot: drop its copy before moving it to another")
        if tier != node.tier:
            was_protected = node.protected
            self._unprotect(node)
            self._count[node.tier] -= 1
            self._count[tier] += 1
            if node.refs:
                self._pinned[node.tier] -= 1
                self._pinned[tier] += 1
            if node.parent is not None:
                _count_child(node.parent, node.tier, -1)
                _count_child(node.parent, tier, +1)
            node.tier = tier
            if was_protected:
                self._protect(node)
                self._demote_excess(tier)
        node.tier, node.slot = tier, slot
        if tier == DISK and node.disk_slot == NO_SLOT:
            node.disk_slot = slot
            self._disk_copies += 1
        self._refresh(node, node.parent)

    def set_disk_slot(self, h: BlockHash, slot: int) -> None:
        """Record (slot >= 0) or forget (NO_SLOT) the disk copy of a device or host block."""
        node = self._nodes[h]
        if node.tier == DISK:
            raise ValueError("a disk-tier block's slot is the block itself: remove the block instead")
        if (node.disk_slot == NO_SLOT) != (slot == NO_SLOT):
            self._disk_copies += 1 if slot != NO_SLOT else -1
        node.disk_slot = slot
        self._refresh(node)

    def remove(self, h: BlockHash) -> BlockRef:
        """Drop an unpinned leaf."""
        node = self._nodes[h]
        if node.children or node.refs:
            raise ValueError(f"block {h.hex()} is pinned or has children; only unpinned leaves are removed")
        self._unprotect(node)
        del self._nodes[h]
        self._count[node.tier] -= 1
        if node.disk_slot != NO_SLOT:
            self._disk_copies -= 1
        for pool in (*self._spill.values(), *self._drop.values(), self._disk):
            pool.discard(h)
        parent = node.parent
        if parent is not None:
            del parent.children[h]
            _count_child(parent, node.tier, -1)
            self._refresh(parent)
        return node.ref()

    # ---- eviction ------------------------------------------------------

    def victims(self, tier: Tier, n: int, *, spill: bool) -> list[BlockRef]:
        """Up to `n` blocks of `tier` to evict, in policy order, children before parents.

        spill=True (device, host): blocks with no child in their tier, to move
        one tier down. spill=False: blocks with no child at all, to drop. The
        choice is simulated ahead, so a parent whose last child is picked
        becomes a candidate in the same call. Nothing is changed here.
        """
        if spill and tier not in self._spill:
            raise ValueError("only device and host blocks are demoted")
        pool = self._spill[tier] if spill else self._drop[tier]
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
            remaining = (_same_tier_children(parent) if spill else len(parent.children)) - taken[parent.hash]
            if remaining == 0:
                heapq.heappush(heap, self._heap_item(parent))
        return out

    def disk_victims(self, n: int) -> list[BlockRef]:
        """Up to `n` disk slots to free, in policy order: copies of device/host blocks (the block
        stays) and disk-tier leaves (the block goes; a parent whose last child is picked becomes a
        candidate in the same call). The refs carry the block's own tier; the slot freed is
        `disk_slot(hash)`. Nothing is changed here."""
        heap = [self._heap_item(self._nodes[h]) for h in self._disk]
        heapq.heapify(heap)
        taken: dict[BlockHash, int] = {}
        out: list[BlockRef] = []
        while heap and len(out) < n:
            node = heapq.heappop(heap)[-1]
            out.append(node.ref())
            parent = node.parent
            if node.tier != DISK or parent is None or parent.refs or parent.tier != DISK:
                continue
            taken[parent.hash] = taken.get(parent.hash, 0) + 1
            if len(parent.children) == taken[parent.hash]:
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
            for tier, pool in self._spill.items():
                _set_member(pool, node.hash, free and node.tier == tier and _same_tier_children(node) == 0)
            leaf = free and not node.children
            for tier, pool in self._drop.items():
                _set_member(pool, node.hash, leaf and node.tier == tier)
            copy = free and node.disk_slot != NO_SLOT and (node.tier != DISK or not node.children)
            _set_member(self._disk, node.hash, copy)


def _count_child(parent: _Node, tier: Tier, delta: int) -> None:
    if tier == DEVICE:
        parent.device_children += delta
    elif tier == HOST:
        parent.host_children += delta


def _same_tier_children(node: _Node) -> int:
    """Children in the node's own tier (what must move down before it can)."""
    if node.tier == DEVICE:
        return node.device_children
    if node.tier == HOST:
        return node.host_children
    return len(node.children)


def _set_member(s: set, key, present: bool) -> None:
    if present:
        s.add(key)
    else:
        s.discard(key)
