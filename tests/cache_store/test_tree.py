import pytest

from cache_store.policy import LFU, LRU
from cache_store.tree import DEVICE, DISK, HOST, PrefixTree

from .helpers import add_path, chain


def test_match_longest_prefix_and_verifies_tokens():
    tree = PrefixTree(LRU())
    hashes, blocks = add_path(tree, list(range(12)))
    assert [r.hash for r in tree.match(hashes, blocks)] == hashes
    other, oblocks = chain(list(range(8)) + [99, 98, 97, 96])
    assert len(tree.match(other, oblocks)) == 2
    assert tree.match(*chain([5] * 12)) == []


def test_hash_collision_is_a_miss_not_wrong_kv():
    tree = PrefixTree(LRU())
    hashes, blocks = add_path(tree, list(range(12)))
    # Same hashes, other tokens (what a collision looks like): the match stops there.
    forged = [blocks[0], (7, 7, 7, 7), blocks[2]]
    assert [r.hash for r in tree.match(hashes, forged)] == hashes[:1]


def test_match_requires_parent_link():
    tree = PrefixTree(LRU())
    hashes, blocks = add_path(tree, list(range(12)))
    # A chain that starts with block 2's hash is not a prefix held here.
    assert tree.match(hashes[1:], blocks[1:]) == []


def test_duplicate_insert_rejected_and_device_child_needs_device_parent():
    tree = PrefixTree(LRU())
    hashes, blocks = add_path(tree, list(range(8)), tier=HOST)
    with pytest.raises(KeyError):
        tree.insert(None, hashes[0], blocks[0], DEVICE, 9)
    h3, b3 = chain(list(range(12)))
    with pytest.raises(ValueError, match="parent must be on device"):
        tree.insert(hashes[1], h3[2], b3[2], DEVICE, 5)


def test_lru_victims_are_leaves_children_first():
    tree = PrefixTree(LRU())
    a, _ = add_path(tree, list(range(12)), slot0=0)  # a0 - a1 - a2
    b, _ = add_path(tree, list(range(8)) + [50, 51, 52, 53], slot0=10)  # shares a0, a1; own leaf b2
    tree.touch(b)  # b path is now most recent
    victims = [v.hash for v in tree.victims(DEVICE, 10, spill=False)]
    assert victims[0] == a[2]  # least recent leaf first
    assert victims.index(b[2]) < victims.index(a[1]) < victims.index(a[0])  # parents only after all children
    assert len(victims) == 4


def test_pinned_blocks_are_never_victims():
    tree = PrefixTree(LRU())
    a, _ = add_path(tree, list(range(12)))
    tree.pin(a)
    assert tree.victims(DEVICE, 10, spill=False) == []
    assert tree.victims(DEVICE, 10, spill=True) == []
    tree.unpin(a)
    assert len(tree.victims(DEVICE, 10, spill=False)) == 3
    with pytest.raises(RuntimeError, match="not pinned"):
        tree.unpin(a)


def test_spill_candidates_are_device_leaves_and_keep_device_closed_upward():
    tree = PrefixTree(LRU())
    a, _ = add_path(tree, list(range(12)))
    # Spill order is children first; moving them in that order never strands a child.
    for v in tree.victims(DEVICE, 3, spill=True):
        tree.move(v.hash, HOST, v.slot)
    assert all(tree.get(h).tier == HOST for h in a)
    with pytest.raises(ValueError, match="promote the parent first"):
        tree.move(a[2], DEVICE, 0)
    for h in a:
        tree.move(h, DEVICE, 0)
    with pytest.raises(ValueError, match="spill the children first"):
        tree.move(a[0], HOST, 0)


def test_the_lfu_policy_is_a_sort_key():
    for policy, setup, first in ((LFU(), lambda t, a, b: (t.touch(a), t.touch(a)), "b"),):
        tree = PrefixTree(policy)
        a, _ = add_path(tree, [1, 1, 1, 1])
        b, _ = add_path(tree, [2, 2, 2, 2])
        tree.touch(b)  # b is more recent than a
        setup(tree, a, b)
        victim = tree.victims(DEVICE, 1, spill=False)[0].hash
        assert victim == (a[0] if first == "a" else b[0])


def test_stats_count_pinned_and_evictable():
    tree = PrefixTree(LRU())
    a, _ = add_path(tree, list(range(12)))
    add_path(tree, [9] * 8, tier=HOST, slot0=5)
    tree.pin(a[:2])
    s = tree.stats()
    assert s.blocks == {DEVICE: 3, HOST: 2, DISK: 0}
    assert s.pinned == {DEVICE: 2, HOST: 0, DISK: 0}
    assert s.evictable == {DEVICE: 1, HOST: 2, DISK: 0}


def test_remove_only_unpinned_leaves():
    tree = PrefixTree(LRU())
    a, _ = add_path(tree, list(range(8)))
    with pytest.raises(ValueError):
        tree.remove(a[0])
    tree.pin(a)
    with pytest.raises(ValueError):
        tree.remove(a[1])
    tree.unpin(a)
    tree.remove(a[1])
    tree.remove(a[0])
    assert len(tree) == 0


def test_segmented_lru_evicts_never_reused_blocks_first():
    from cache_store.policy import SegmentedLRU

    tree = PrefixTree(SegmentedLRU())
    shared, _ = add_path(tree, [1, 1, 1, 1])
    tree.touch(shared)  # reused once
    one_shot, _ = add_path(tree, [2, 2, 2, 2])  # newer, but never reused
    assert tree.victims(DEVICE, 1, spill=False)[0].hash == one_shot[0]
    lru = PrefixTree(LRU())
    s2, _ = add_path(lru, [1, 1, 1, 1])
    lru.touch(s2)
    o2, _ = add_path(lru, [2, 2, 2, 2])
    assert lru.victims(DEVICE, 1, spill=False)[0].hash == s2[0]  # plain LRU would drop the shared one
