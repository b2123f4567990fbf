"""Scheduler and BlockManager on their own: a real TieredStore, no model (a step is simulated by
committing what the schedule feeds and appending a token where a request would sample)."""

import time

import torch

from cache_store import CacheConfig, KVShape, TieredStore, block_chain, root_hash, token_blocks
from worker.block_manager import BlockManager
from worker.request import Request
from worker.sampling import make_generator
from worker.scheduler import Scheduler
from worker.sequence import Sequence, Status

BS = 4
SHAPE = KVShape(layers=1, kv_heads=1, block_size=BS, head_dim=2, dtype=torch.float32)
ROOT = root_hash("m", None)


def make(device_blocks: int, rows: int = 4) -> tuple[TieredStore, BlockManager]:
    cfg = CacheConfig(block_size=BS, device_bytes=device_blocks * SHAPE.block_bytes, host_bytes=0)
    store = TieredStore(cfg, SHAPE)
    return store, BlockManager(store, BS, rows)


def seq_of(prompt: list[int], new: int = 4) -> Sequence:
    return Sequence(
        Request(prompt, max_new_tokens=new),
        list(prompt),
        ROOT,
        make_generator(0),
        time.perf_counter(),
        chain=block_chain(ROOT, prompt, BS),
        chain_blocks=token_blocks(prompt, BS),
    )


def run_step(sched: Scheduler, token: int = 7) -> list[tuple[Sequence, int]]:
    step = sched.schedule()
    for seq, n in step.batch:
        sched.blocks.commit(seq, n)
        sched.committed(seq)
        if seq.kv_len == seq.num_tokens:
            seq.out.append(token)
    return step.batch


def check_table(seq: Sequence) -> None:
    t = seq.blocks
    assert t.pinned <= t.full <= len(t)
    assert all(e.owned for e in t.entries[t.pinned :]), "entries past the pinned path are working slots"
    assert len(t) * BS >= seq.kv_len


def test_fresh_request_fills_adopts_and_releases_everything():
    store, bm = make(8)
    seq = seq_of(list(range(10)))
    bm.open_table(seq)
    assert seq.blocks.row >= 0 and len(seq.blocks) == 0 and seq.kv_len == 0
    assert bm.reserve(seq, 10) and len(seq.blocks) == 3 and store.working_blocks == 3
    bm.commit(seq, 10)
    check_table(seq)
    assert (seq.blocks.full, seq.blocks.pinned) == (2, 2)  # two full blocks adopted in place
    assert [e.owned for e in seq.blocks.entries] == [False, False, True]
    assert store.lookup(seq.chain, seq.chain_blocks) == 2 and store.working_blocks == 1
    row = seq.blocks.row
    bm.release(seq)
    assert store.working_blocks == 0 and store.stats().device.pinned == 0 and seq.blocks.row == -1
    store.check_invariants()
    again = seq_of(list(range(10)))
    bm.open_table(again)
    assert again.blocks.row == row  # rows are reused
    assert again.kv_len == 8 and [e.owned for e in again.blocks.entries] == [False, False]


def test_whole_prompt_cached_copies_the_last_block_before_rewriting_it():
    store, bm = make(8)
    first = seq_of(list(range(8)))
    bm.open_table(first)
    bm.reserve(first, 8)
    bm.commit(first, 8)
    cached_slots = [e.slot for e in first.blocks.entries]
    bm.release(first)
    seq = seq_of(list(range(8)))
    bm.open_table(seq)
    assert seq.kv_len == 7  # the last prompt token is always recomputed
    assert seq.blocks.pinned == 2 and seq.blocks.full == 2
    assert seq.blocks.entries[0].slot == cached_slots[0] and not seq.blocks.entries[0].owned
    assert seq.blocks.entries[1].owned and seq.blocks.entries[1].slot != cached_slots[1]
    check_table(seq)
    bm.release(seq)
    assert store.working_blocks == 0 and store.stats().device.pinned == 0
    store.check_invariants()


def test_copy_on_write_without_a_free_slot_recomputes_the_block():
    store, bm = make(2)
    first = seq_of(list(range(8)))
    bm.open_table(first)
    bm.reserve(first, 8)
    bm.commit(first, 8)
    bm.release(first)
    holder = seq_of(list(range(8)))  # pins both cached blocks: the pool has no slot left to copy into
    bm.open_table(holder)
    other = seq_of(list(range(8)))
    bm.open_table(other)
    assert other.kv_len == 4 and other.blocks.pinned == 1 and len(other.blocks) == 1
    check_table(other)
    for s in (holder, other):
        bm.release(s)
    assert store.working_blocks == 0 and store.stats().device.pinned == 0


def test_a_block_two_requests_compute_at_once_is_shared_and_the_copy_freed():
    store, bm = make(8)
    a, b = seq_of(list(range(4))), seq_of(list(range(4)))
    for s in (a, b):
        bm.open_table(s)
        bm.reserve(s, 4)
    bm.commit(a, 4)
    bm.commit(b, 4)
    assert not a.blocks.entries[0].owned  # a's slot joined the cache
    assert b.blocks.pinned == 1 and b.blocks.entries[0].owned  # b pins a's copy, frees its own later
    bm.release(a)
    bm.release(b)
    assert store.working_blocks == 0 and store.stats().device.blocks == 1
    store.check_invariants()


def test_a_request_waits_for_the_blocks_another_is_computing_and_keeps_what_it_holds():
    store, bm = make(16)
    sched = Scheduler(bm, max_running=4, max_batch_tokens=16)  # b is looked at in a's first step
    fetched = list(range(100, 108))  # two blocks b pulled from a peer before admission (held)
    a, b = seq_of(fetched + list(range(12))), seq_of(fetched + list(range(12)) + [99])
    store.insert(None, b.chain[:2], b.chain_blocks[:2], torch.zeros((2, *SHAPE.block_dims)))
    b.peer_hold = store.acquire(b.chain[:2], b.chain_blocks[:2])
    sched.add(a)
    sched.add(b)
    assert [s for s, _ in run_step(sched)] == [a] and a.cached_tokens == 8
    assert b.status is Status.WAITING and b.blocks.row == -1 and len(b.blocks) == 0
    assert b.peer_hold is not None  # deferred before pinning: its peer blocks stay held
    while a.kv_len < 20:
        run_step(sched)
    while b.status is Status.WAITING:
        run_step(sched)
    assert b.cached_tokens == 20  # it hit every block a computed instead of computing them again
    assert b.peer_hold is None  # released at admission, the blocks now pinned by its table


def test_preemption_takes_the_newest_and_it_resumes_from_its_cached_blocks():
    store, bm = make(6)
    sched = Scheduler(bm, max_running=4, max_batch_tokens=64)
    old, new = seq_of(list(range(8)), new=20), seq_of(list(range(100, 108)), new=20)
    sched.add(old)
    run_step(sched)  # old: 8 prompt tokens, 2 blocks
    sched.add(new)
    run_step(sched)  # new: 2 blocks; old decodes into a third
    for _ in range(8):
        step = sched.schedule()
        for seq, n in step.batch:
            bm.commit(seq, n)
            sched.committed(seq)
            if seq.kv_len == seq.num_tokens:
                seq.out.append(7)
        if step.preempted:
            break
    assert step.preempted == [new] and [s for s, _ in step.batch] == [old]
    assert new.status is Status.WAITING and sched.waiting[0] is new and new.preemptions == 1
    assert new.blocks.row == -1 and len(new.blocks) == 0
    assert store.lookup(new.chain, new.chain_blocks) == 2  # its full blocks stayed cached
    check_table(old)
    cached = new.cached_tokens
    sched.finish(old)
    run_step(sched)
    assert new.status is Status.RUNNING and new.kv_len >= 8  # resumed on its cached blocks
    assert new.cached_tokens == cached  # hits are counted at the first admission only
