"""Eviction policies. A policy is a sort key: the block with the smallest key goes first.

Keys read only node statistics that the tree maintains (`last_access`, a
logical clock value; `hits`; `copies`), so a new policy is one small class.
Ties are broken by the tree (deeper block first, then hash) so eviction order
is deterministic.
"""

from __future__ import annotations

from typing import Protocol


class NodeStats(Protocol):
    last_access: int
    hits: int
    copies: int  # workers holding the block cluster-wide (1 when unknown)
    protected: bool  # in the tree's protected segment (bounded SLRU bookkeeping)


class EvictionPolicy(Protocol):
    name: str

    def key(self, node: NodeStats) -> tuple[int, ...]: ...


class LRU:
    """Least recently used first."""

    name = "lru"

    def key(self, node: NodeStats) -> tuple[int, ...]:
        return (node.last_access,)


class SegmentedLRU:
    """Blocks never reused go first (one-shot content: each user's own question, generated text),
    then least recently used. Shared prefixes survive a stream of unique requests.

    Not the default: the protected segment is unbounded, so once a full cache holds only reused
    blocks, every new block is the first victim, including the last turn of a live chat, which is
    about to be reused. Measured (docs/bench-slru-2026-11-23.md, `prefixcache bench` with slru as the default): shared-system-prompt hit
    rate 84.0% vs 78-81% under LRU, but chat hit rate 26% vs 64% after that workload filled the cache.
    """

    name = "slru"

    def key(self, node: NodeStats) -> tuple[int, ...]:
        return (min(node.hits, 1), node.last_access)


class BoundedSLRU:
    """Segmented LRU with a bounded protected segment: reused blocks are protected, up to
    `protected_fraction` of the tier; past that the least recently used protected block is
    demoted to probation. Probation (new blocks, demoted ones) goes first, LRU within a segment.

    Why bounded: the unbounded `slru` protects every block ever reused, so a cache full of old
    reused blocks evicts every new block first, including a live chat's last turn (chat hit rate
    26% vs LRU's 64% in one run, docs/bench-slru-2026-11-23.md). With a cap, one-shot questions
    still cannot push out hot system prompts (they churn through probation), and the newest turns
    always have room. 80% measured better than 50% (`python -m cluster.bench.eviction`: shared
    system prompts 83.2% vs 81.6% at 2 workers, chats 63.7% either way; BENCHMARKS.md).
    """

    name = "bounded_slru"
    protected_fraction = 0.8

    def key(self, node: NodeStats) -> tuple[int, ...]:
        return (int(node.protected), node.last_access)


class LFU:
    """Fewest hits first; among equals, least recently used."""

    name = "lfu"

    def key(self, node: NodeStats) -> tuple[int, ...]:
        return (node.hits, node.last_access)


class DuplicatesFirst:
    """Blocks that another worker also holds go first, then `base` order among equals.

    Losing a duplicate costs the cluster nothing it cannot fetch back (a peer still has it); losing
    a sole copy costs a recompute. So when room must be made, copies go before sole blocks. `copies`
    is a local view refreshed in batch from the index (`TieredStore.refresh_copies`), never read
    per eviction; with no refresh every block counts 1 and this is exactly `base`.
    """

    def __init__(self, base: EvictionPolicy):
        self.base = base
        self.name = f"{base.name}+duplicates_first"

    def key(self, node: NodeStats) -> tuple[int, ...]:
        return (int(node.copies <= 1), *self.base.key(node))


POLICIES: dict[str, type] = {cls.name: cls for cls in (LRU, SegmentedLRU, BoundedSLRU, LFU)}


def make_policy(name: str, *, duplicates_first: bool = False) -> EvictionPolicy:
    try:
        policy = POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return DuplicatesFirst(policy) if duplicates_first else policy
