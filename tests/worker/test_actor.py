"""Two worker actors on a local Ray cluster: serve, publish, export, fetch from a peer."""

import msgpack
import numpy as np
import pytest
import ray

from cache_store import MetadataIndex
from worker.actor import NAMESPACE, WorkerActor, worker_actor_name
from worker.request import Request
from worker.transfer import BadTransfer, unpack_blocks

BS = 16
CACHE = {"block_size": BS, "device_bytes": 8 << 20, "host_bytes": 8 << 20, "service": "acttest"}


def start_workers(url, ids=("w0", "w1")):
    handles = {
        wid: WorkerActor.options(name=worker_actor_name("acttest", wid), namespace=NAMESPACE, num_cpus=1).remote(
            wid, "demo", CACHE, redis_url=url
        )
        for wid in ids
    }
    ray.get([h.health.remote() for h in handles.values()])
    return handles


def stop_workers(handles):
    for h in handles.values():
        try:
            ray.get(h.shutdown.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            pass  # a test killed it on purpose
        ray.kill(h)


@pytest.fixture(scope="module")
def module_valkey():
    from cache_store import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def two_workers(ray_local, module_valkey):
    handles = start_workers(module_valkey.url)
    yield handles
    stop_workers(handles)


@pytest.fixture
def doomed_workers(ray_local, valkey):
    handles = start_workers(valkey.url, ("d0", "d1"))
    yield handles
    stop_workers(handles)


def test_workers_serve_and_publish_their_blocks(two_workers, module_valkey):
    w0, w1 = two_workers["w0"], two_workers["w1"]
    prompt = "Shared system prompt for the actor test. " * 3
    r0 = ray.get(w0.generate.remote(Request(prompt, max_new_tokens=4).to_dict()))
    r1 = ray.get(w1.generate.remote(Request(prompt + "second", max_new_tokens=4).to_dict()))
    assert r0["error"] is None and r1["error"] is None
    assert r0["worker_id"] == "w0" and r1["worker_id"] == "w1"
    info = ray.get(w0.info.remote())
    index = MetadataIndex(module_valkey.url, _cfg())
    from cache_store import block_chain, root_hash

    ids = list(prompt.encode())
    chain = block_chain(root_hash(info["fingerprint"], None), ids, BS)
    held = {h.worker_id: h.blocks for h in index.holders(chain)}
    assert held == {"w0": len(chain), "w1": len(chain)}
    health = ray.get(w0.health.remote())
    assert health["index_connected"] and health["device"] == "cpu" and health["generation"] >= 1


def test_bad_request_dict_is_an_error_result(two_workers):
    r = ray.get(two_workers["w0"].generate.remote({"prompt": "x", "bogus": 1}))
    assert "unknown field" in r["error"] and r["finish_reason"] == "error"
    ok = ray.get(two_workers["w0"].generate.remote(Request("still serving", max_new_tokens=1).to_dict()))
    assert ok["error"] is None


def test_peer_fetch_gives_identical_output(two_workers):
    w0, w1 = two_workers["w0"], two_workers["w1"]
    costs = ray.get(w1.calibrate.remote("w0"))
    assert costs["transfer_s_per_block"] >= 0 and costs["crossover_blocks"] >= 0
    prompt = "A long shared prefix that only w0 has computed so far. " * 6
    cold = ray.get(w0.generate.remote(Request(prompt, max_new_tokens=8).to_dict()))
    n_blocks = len(prompt.encode()) // BS
    fetched = ray.get(w1.generate.remote(Request(prompt, max_new_tokens=8).to_dict(), None, ("w0", n_blocks)))
    assert fetched["token_ids"] == cold["token_ids"]
    assert fetched["cached_peer_tokens"] == n_blocks * BS == fetched["cached_tokens"]
    again = ray.get(w1.generate.remote(Request(prompt, max_new_tokens=8).to_dict()))
    assert again["cached_device_tokens"] == n_blocks * BS  # what it pulled is now its own


def test_peer_fetch_from_a_dead_peer_recomputes(doomed_workers):
    w0, w1 = doomed_workers["d0"], doomed_workers["d1"]
    ray.get(w1.calibrate.remote("d0"))
    prompt = "Prefix held by a peer that dies. " * 6
    cold = ray.get(w0.generate.remote(Request(prompt, max_new_tokens=6).to_dict()))
    ray.kill(w0)
    r = ray.get(w1.generate.remote(Request(prompt, max_new_tokens=6).to_dict(), None, ("d0", 10)))
    assert r["error"] is None and r["token_ids"] == cold["token_ids"]
    assert r["cached_tokens"] == 0
    assert ray.get(w1.stats.remote())["counters"]["peer_fetch_failures"] == 1


def test_malformed_transfer_is_rejected():
    with pytest.raises(BadTransfer):
        unpack_blocks(b"\x93garbage", np.zeros(4, np.uint8))
    meta = msgpack.packb({"hashes": [b"x" * 16], "tokens": [[1] * 16], "dtype": "float32", "shape": [1, 2]})
    with pytest.raises(BadTransfer, match="expected 8"):
        unpack_blocks(meta, np.zeros(4, np.uint8))


def _cfg():
    from cache_store import CacheConfig

    return CacheConfig(service="acttest")


def test_chunks_waiting_behind_one_go_out_as_one_message():
    import asyncio

    from worker.actor import ready_chunks
    from worker.request import ErrorKind, Result
    from worker.sequence import Chunk

    async def drain(items):
        q: asyncio.Queue = asyncio.Queue()
        for c in items[1:]:
            q.put_nowait(c)
        return ready_chunks(items[0], q), q.qsize()

    done = Chunk("", (), Result.failed("x", ErrorKind.INTERNAL))
    pieces = [Chunk("a", (1,)), Chunk("bc", (2, 3)), Chunk("d", (4,))]
    out, left = asyncio.run(drain([*pieces, done, Chunk("late", (9,))]))
    assert out == [Chunk("abcd", (1, 2, 3, 4)), done] and left == 1  # nothing after the result is taken
    assert asyncio.run(drain([pieces[0]])) == ([pieces[0]], 0)  # nothing waiting: sent as it came
    assert asyncio.run(drain([done, pieces[0]])) == ([done], 1)
