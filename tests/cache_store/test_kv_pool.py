import pytest
import torch

from cache_store import KVPool, PoolExhausted

from .helpers import SHAPE, kv_for


def test_capacity_from_byte_budget():
    assert SHAPE.block_bytes == 2 * 2 * 1 * 4 * 2 * 4
    pool = KVPool.from_budget(SHAPE, SHAPE.block_bytes * 5 + 7, "cpu")
    assert pool.capacity == 5
    assert pool.nbytes <= SHAPE.block_bytes * 5 + 7
    assert pool.data.shape == (5, 2, 2, 1, 4, 2)


def test_alloc_free_and_double_free():
    pool = KVPool(SHAPE, 3, "cpu")
    slots = pool.alloc(3)
    assert sorted(slots) == [0, 1, 2] and pool.free_count == 0
    with pytest.raises(PoolExhausted):
        pool.alloc(1)
    pool.free(slots[:1])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(slots[:1])
    assert pool.used_count == 2


def test_write_read_roundtrip():
    pool = KVPool(SHAPE, 6, "cpu")
    hashes = [bytes([i]) * 16 for i in range(4)]
    slots = pool.alloc(4)
    pool.write(slots, kv_for(hashes))
    assert torch.equal(pool.read(slots), kv_for(hashes))
    order = [2, 0, 3]
    assert torch.equal(pool.read([slots[i] for i in order]), kv_for([hashes[i] for i in order]))


def test_write_rejects_wrong_shape():
    pool = KVPool(SHAPE, 2, "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        pool.write(pool.alloc(1), torch.zeros(2, *SHAPE.block_dims))
