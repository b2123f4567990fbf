"""Bounded SLRU: reused blocks are protected up to a share of the tier; the oldest are demoted."""

from cache_store import DEVICE, HOST, PrefixTree
from cache_store.policy import BoundedSLRU, SegmentedLRU

from .helpers import add_path, chain, make_store, serve


def test_reuse_protects_and_the_limit_demotes_the_oldest():
    tree = PrefixTree(BoundedSLRU())
    tree.set_protected_limit(DEVICE, 2)
    a, _ = add_path(tree, [1] * 4)
    b, _ = add_path(tree, [2] * 4)
    c, _ = add_path(tree, [3] * 4)
    new, _ = add_path(tree, [4] * 4)  # never reused: probation
    for path in (a, b, c):
        tree.touch(path)
    assert tree.protected_count(DEVICE) == 2  # a was demoted when c was protected
    order = [v.hash for v in tree.victims(DEVICE, 4, spill=False)]
    assert order == [new[0], a[0], b[0], c[0]]  # probation (LRU: new, then demoted a), then protected LRU


def test_a_full_cache_of_reused_blocks_still_keeps_the_newest_turn():
    # The failure of unbounded SLRU: every old block was reused once, so the live chat's newest
    # turn (not reused yet) is the first victim. With the cap, old reused blocks fall to probation.
    def fill(tree):
        old = [add_path(tree, [10 + i] * 4)[0] for i in range(6)]
        for path in old:
            tree.touch(path)
        turn, _ = add_path(tree, [99] * 4)  # the newest chat turn, reused only on the next turn
        return old, turn

    unbounded = PrefixTree(SegmentedLRU())
    old, turn = fill(unbounded)
    assert unbounded.victims(DEVICE, 1, spill=False)[0].hash == turn[0]
    bounded = PrefixTree(BoundedSLRU())
    bounded.set_protected_limit(DEVICE, 3)
    old, turn = fill(bounded)
    assert bounded.victims(DEVICE, 1, spill=False)[0].hash == old[0][0]


def test_one_shot_blocks_churn_through_probation_and_spare_the_protected():
    store = make_store(6, 0, eviction="bounded_slru", duplicates_first=False)
    assert store.tree._protected_limit[DEVICE] == 4  # 80% of 6
    system = [7] * 8  # two blocks, reused
    serve(store, system)
    serve(store, system)
    for q in range(10):  # a stream of one-shot questions
        serve(store, [100 + q] * 4)
    hashes, blocks = chain(system)
    assert store.lookup(hashes, blocks) == 2
    store.check_invariants()


def test_protection_follows_a_block_between_tiers():
    store = make_store(2, 4, eviction="bounded_slru", duplicates_first=False)
    serve(store, [1] * 4)
    serve(store, [1] * 4)  # reused: protected on device
    h, _ = chain([1] * 4)
    assert store.tree.protected_count(DEVICE) == 1
    serve(store, [2] * 8)  # needs both device slots: the protected block spills to host
    assert store.tree.get(h[0]).tier == HOST
    assert (store.tree.protected_count(DEVICE), store.tree.protected_count(HOST)) == (0, 1)
    store.check_invariants()
