import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cache_store import DEVICE, HOST, time_promotion

from .helpers import SHAPE, chain, expected_layers, gather, kv_for, make_store, serve


def assert_kv(store, hold, hashes):
    for (k, v), (wk, wv) in zip(gather(store, hold), expected_layers(hashes)):
        assert torch.equal(k, wk) and torch.equal(v, wv)


def test_insert_then_hit_returns_the_same_kv():
    store = make_store(8, 8)
    tokens = list(range(14))  # 3 full blocks + 2 tail tokens
    assert serve(store, tokens) == 0
    hashes, blocks = chain(tokens)
    hold = store.acquire(hashes, blocks)
    assert len(hold) == 3 and hold.device_hits == 3 and hold.host_hits == 0
    assert_kv(store, hold, hashes)
    cut = gather(store, hold, n_tokens=9)
    assert cut[0][0].shape[2] == 9
    store.release(hold)
    store.check_invariants()


def test_device_full_spills_lru_to_host_then_promotes_on_hit():
    store = make_store(4, 8)
    a = list(range(8))  # 2 blocks
    b = [100 + i for i in range(8)]
    c = [200 + i for i in range(8)]
    serve(store, a)
    serve(store, b)
    serve(store, c)  # device holds 4 blocks: a (LRU) is spilled to host
    s = store.stats()
    assert (s.device.blocks, s.host.blocks) == (4, 2)
    assert s.counters["spilled_blocks"] == 2
    ha, ba = chain(a)
    hold = store.acquire(ha, ba)
    assert (hold.device_hits, hold.host_hits) == (0, 2)
    assert all(r.tier == DEVICE for r in hold.blocks)  # promoted (b spilled to make room)
    assert_kv(store, hold, ha)
    store.release(hold)
    assert store.stats().counters["promoted_blocks"] == 2
    store.check_invariants()


def test_host_full_drops_and_budgets_hold():
    store = make_store(2, 2)
    for p in range(6):
        serve(store, [p * 10 + i for i in range(8)])
    s = store.stats()
    assert s.device.blocks <= 2 and s.host.blocks <= 2
    assert s.device.bytes_used <= s.device.bytes_capacity
    assert s.counters["dropped_blocks_host"] > 0
    store.check_invariants()


def test_pinned_blocks_survive_pressure_and_keep_their_bytes():
    store = make_store(3, 0)
    a = list(range(8))
    serve(store, a)
    ha, ba = chain(a)
    hold = store.acquire(ha, ba)
    for p in range(1, 6):
        serve(store, [p * 10 + i for i in range(8)])  # would evict a if it were not pinned
    assert store.lookup(ha, ba) == 2
    assert_kv(store, hold, ha)
    store.release(hold)
    store.check_invariants()


def test_new_blocks_go_to_host_when_device_is_all_pinned():
    store = make_store(2, 4)
    a = list(range(8))
    serve(store, a)
    ha, ba = chain(a)
    hold = store.acquire(ha, ba)  # both device slots pinned
    b = [50 + i for i in range(8)]
    serve(store, b)
    hb, bb = chain(b)
    assert store.lookup(hb, bb) == 2
    s = store.stats()
    assert (s.device.blocks, s.host.blocks) == (2, 2)
    hold_b = store.acquire(hb, bb)
    assert [r.tier for r in hold_b.blocks] == [HOST, HOST]  # no room to promote: served from host
    assert_kv(store, hold_b, hb)
    store.release(hold_b)
    store.release(hold)
    store.check_invariants()


def test_nothing_cached_when_everything_is_pinned():
    store = make_store(1, 0)
    serve(store, [1, 2, 3, 4])
    h, b = chain([1, 2, 3, 4])
    hold = store.acquire(h, b)
    assert serve(store, [5, 6, 7, 8]) == 0
    assert store.lookup(*chain([5, 6, 7, 8])) == 0
    assert store.stats().counters["insert_skipped_blocks"] == 1
    store.release(hold)


def test_insert_skips_present_blocks_and_refuses_collisions():
    store = make_store(8, 0)
    tokens = list(range(12))
    h, b = chain(tokens)
    assert store.insert(None, h, b, kv_for(h)) == 3
    assert store.insert(None, h, b, kv_for(h)) == 3  # idempotent
    forged = [b[0], (9, 9, 9, 9), b[2]]
    assert store.insert(None, h, forged, kv_for(h)) == 1
    assert store.stats().counters["hash_collisions"] == 1


def test_salt_never_hits_another_tenant():
    store = make_store(8, 0)
    tokens = list(range(12))
    serve(store, tokens, salt="tenant-a")
    assert store.lookup(*chain(tokens, salt="tenant-a")) == 3
    assert store.lookup(*chain(tokens, salt="tenant-b")) == 0
    assert store.lookup(*chain(tokens)) == 0


def test_export_copies_the_leading_run():
    store = make_store(2, 4)
    tokens = list(range(16))
    serve(store, tokens)  # 4 blocks: 2 end up on host
    h, b = chain(tokens)
    ex = store.export(h + [b"\x00" * 16])
    assert ex.hashes == h and ex.tokens == [tuple(x) for x in b]
    assert torch.equal(ex.kv, kv_for(h))
    assert store.export([b"\x01" * 16]).hashes == []


def test_pin_prefix_keeps_a_system_prompt():
    store = make_store(2, 0)
    sys_prompt = list(range(8))
    serve(store, sys_prompt)
    h, b = chain(sys_prompt)
    assert store.pin_prefix(h, b) == 2
    for p in range(1, 5):
        serve(store, [p * 10 + i for i in range(8)])
    assert store.lookup(h, b) == 2
    assert store.unpin_prefix(h)
    serve(store, [90 + i for i in range(8)])
    assert store.lookup(h, b) == 0
    assert not store.unpin_prefix(h)


ALPHABET = st.sampled_from([0, 1, 2])


class StoreMachine(RuleBasedStateMachine):
    """Random serve/hold/release sequences on tiny pools: never wrong KV, never over budget, no leak."""

    def __init__(self):
        super().__init__()
        self.store = make_store(5, 4)
        self.holds = []

    @rule(tokens=st.lists(ALPHABET, min_size=4, max_size=20))
    def serve(self, tokens):
        serve(self.store, tokens)

    @rule(tokens=st.lists(ALPHABET, min_size=4, max_size=20))
    def hold(self, tokens):
        h, b = chain(tokens)
        hold = self.store.acquire(h, b)
        assert hold.hashes == h[: len(hold)]
        self.holds.append(hold)

    @precondition(lambda self: self.holds)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        self.store.release(self.holds.pop(i % len(self.holds)))

    @invariant()
    def held_kv_is_exact_and_books_balance(self):
        for hold in self.holds:
            assert_kv(self.store, hold, hold.hashes)
        self.store.check_invariants()
        s = self.store.stats()
        assert s.device.blocks <= s.device.capacity and s.host.blocks <= s.host.capacity

    def teardown(self):
        for hold in self.holds:
            self.store.release(hold)
        assert self.store.stats().device.pinned == 0 and self.store.stats().host.pinned == 0


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_time_promotion_times_one_host_to_device_promotion():
    assert 0 < time_promotion(SHAPE, "cpu") < 1  # raises if the block was not promoted from host


def test_clear_drops_every_unpinned_block_in_both_tiers_and_keeps_held_ones():
    store = make_store(4, 8)
    for base in (0, 100, 200, 300):
        serve(store, [base + i for i in range(8)])  # 8 blocks: 4 on device, 4 spilled to host
    held_hashes, held_blocks = chain([300 + i for i in range(8)])
    hold = store.acquire(held_hashes, held_blocks)
    assert store.stats().host.blocks > 0
    dropped = store.clear()
    s = store.stats()
    assert dropped == 6 and (s.device.blocks, s.host.blocks) == (2, 0)
    assert store.lookup(held_hashes, held_blocks) == 2
    store.release(hold)
    assert store.clear() == 2 and store.stats().device.blocks == 0
    store.check_invariants()
