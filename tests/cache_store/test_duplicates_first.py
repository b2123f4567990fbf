"""Duplicates-first eviction: a block another worker also holds goes before a sole copy.

The holder counts come from a real index (embedded Valkey) in one batched read, never per eviction.
"""

from cache_store import DEVICE, LRU, MetadataIndex, PrefixTree
from cache_store.policy import DuplicatesFirst

from .helpers import add_path, chain, make_store, serve


def test_a_copy_goes_before_an_older_sole_block():
    tree = PrefixTree(DuplicatesFirst(LRU()))
    sole, _ = add_path(tree, [1, 1, 1, 1])
    copy, _ = add_path(tree, [2, 2, 2, 2])  # newer
    assert tree.victims(DEVICE, 1, spill=False)[0].hash == sole[0]  # unknown counts: plain LRU
    tree.set_copies({copy[0]: 2, sole[0]: 1})
    assert tree.victims(DEVICE, 1, spill=False)[0].hash == copy[0]
    tree.set_copies({copy[0]: 1})  # the other holder dropped it: a sole copy again
    assert tree.victims(DEVICE, 1, spill=False)[0].hash == sole[0]


def test_store_reads_counts_from_the_index_and_evicts_the_copy(valkey):
    idx = MetadataIndex(valkey.url)
    a, b = make_store(3, 0), make_store(3, 0)
    for name, store in (("a", a), ("b", b)):
        store.bind_index(idx, name)
        store.set_generation(idx.register(name))
        store.resync()
    shared, only_a = [7] * 4, [8] * 4
    serve(a, only_a)  # older, held by a alone
    serve(a, shared)
    serve(b, shared)
    h_shared, _ = chain(shared)
    h_only, _ = chain(only_a)
    assert idx.holder_counts(h_shared + h_only) == {h_shared[0]: 2, h_only[0]: 1}
    assert a.refresh_copies() == 2
    serve(a, [9] * 4)
    serve(a, [10] * 4)  # two new blocks in a 3-block store: one block must go
    assert "a" in idx.block_entries(h_only[0])  # the older sole copy stayed
    assert "a" not in idx.block_entries(h_shared[0]) and "b" in idx.block_entries(h_shared[0])


def test_exported_blocks_count_as_copies_until_refreshed():
    store = make_store(4, 0)
    serve(store, [1] * 4)
    serve(store, [2] * 4)
    h1, _ = chain([1] * 4)
    h2, _ = chain([2] * 4)
    store.export(h2)  # a peer pulls the newer one
    assert store.tree.victims(DEVICE, 1, spill=False)[0].hash == h2[0]


def test_switched_off_it_is_the_base_policy():
    store = make_store(4, 0, duplicates_first=False)
    serve(store, [1] * 4)
    serve(store, [2] * 4)
    h1, _ = chain([1] * 4)
    h2, _ = chain([2] * 4)
    store.export(h2)
    assert store.tree.victims(DEVICE, 1, spill=False)[0].hash == h1[0]
    assert store.refresh_copies() == 0


def test_the_heartbeat_refreshes_the_counts(valkey):
    from cache_store import LeaseKeeper

    idx = MetadataIndex(valkey.url)
    a, b = make_store(4, 0), make_store(4, 0)
    keepers = [LeaseKeeper(idx, s, name) for name, s in (("a", a), ("b", b))]
    for k in keepers:
        k.beat()
    serve(a, [1] * 4)
    serve(a, [2] * 4)
    serve(b, [2] * 4)
    h2, _ = chain([2] * 4)
    assert a.tree.victims(DEVICE, 1, spill=False)[0].hash != h2[0]  # not known yet: LRU
    keepers[0].beat()
    assert a.tree.victims(DEVICE, 1, spill=False)[0].hash == h2[0]
