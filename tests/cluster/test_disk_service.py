"""The disk tier in a live service: `--disk-cache-dir` reaches the workers (one directory each),
`warm` pins prompts there, a worker SIGKILLed and restarted by Ray rebuilds its tree from its slot
headers, pins the warmed prompt again (read back from disk) and publishes those blocks to the index
under its new generation, the next request hits them and is exact, and the dashboard's snapshot and
/metrics show the disk tier."""

from __future__ import annotations

import json
import os
import signal

import ray

from cache_store import CacheConfig, EmbeddedRedis, MetadataIndex, block_chain, root_hash
from cache_store import counter_names as cn
from cluster import Cluster
from cluster.cli.main import main as cli
from cluster.dashboard.collect import collect
from cluster.dashboard.metrics import render
from tests.polling import wait_for
from worker.actor import NAMESPACE, worker_actor_name

from .reference import greedy

FAST = dict(lease_ttl_s=3.0, heartbeat_s=0.5, device_cache_gb=0.05, host_cache_gb=0.05)
SYSTEM = "A system prompt that the disk tier keeps across a restart of its worker. " * 4


def _restarted(handle, old_pid):
    try:
        h = ray.get(handle.health.remote(), timeout=5)
    except ray.exceptions.RayError:
        return None
    return h if h["pid"] != old_pid and h["generation"] else None


def test_warm_restart_publishes_disk_blocks_under_the_new_generation_and_hits(ray_local, tmp_path):
    with EmbeddedRedis() as redis_srv:
        c = Cluster.start(
            workers=1,
            service="t-disk",
            redis_url=redis_srv.url,
            max_restarts=1,
            disk_cache_dir=str(tmp_path),
            disk_cache_gb=0.05,
            **FAST,
        )
        try:
            [warmed] = c.warm([SYSTEM])
            [(w, pinned)] = warmed["workers"].items()
            blocks = len(SYSTEM.encode()) // 16  # the demo model's tokens are bytes
            assert pinned == blocks * 16
            assert (tmp_path / "t-disk" / w / "LOCK").exists()  # its own directory under --disk-cache-dir
            handle = ray.get_actor(worker_actor_name("t-disk", w), namespace=NAMESPACE)
            wait_for(
                lambda: ray.get(handle.stats.remote())["counters"].get(cn.DISK_WRITTEN_BLOCKS, 0) >= blocks,
                "the pinned prefix's blocks on disk",
            )
            before = ray.get(handle.health.remote())
            os.kill(before["pid"], signal.SIGKILL)
            after = wait_for(lambda: _restarted(handle, before["pid"]), "Ray to restart the worker", timeout=90)
            assert after["generation"] > before["generation"]

            index = MetadataIndex(redis_srv.url, CacheConfig(service="t-disk"))
            chain = block_chain(root_hash(c.config["fingerprint"], None), list(SYSTEM.encode()), 16)

            def published():
                held = [h for h in index.holders(chain) if h.worker_id == w]
                return held if held and held[0].generation == after["generation"] else None

            [h] = wait_for(published, "the rebuilt blocks in the index under the new generation")
            assert h.blocks == blocks and h.disk_blocks == 0  # all of them, read back into memory: pinned again
            restarted = ray.get(handle.stats.remote())
            assert restarted["counters"][cn.DISK_RESTORED_PINS] == 1
            assert restarted["device_tier"]["pinned"] + restarted["host_tier"]["pinned"] == blocks
            wait_for(lambda: w in c.config_now()["alive"], "the router to see the worker alive", timeout=30)
            [r] = c.generate([SYSTEM + "after"], max_new_tokens=4)
            assert r.ok and r.token_ids == greedy(SYSTEM + "after", 4)
            assert r.cached_tokens == blocks * 16  # hits resume, from disk
            stats = ray.get(handle.stats.remote())
            assert stats["disk"]["hits"] >= blocks and stats["disk"]["corrupt_slots"] == 0

            def snapshot():
                s = collect(index)
                row = next(x for x in s["workers"] if x["worker_id"] == w)
                return (s, row) if row["disk"]["hits"] >= blocks else None

            s, row = wait_for(snapshot, "the disk hits in the index's counters (next heartbeat)")
            assert row["tiers"]["disk"]["capacity"] > 0 and row["tiers"]["disk"]["bytes"] > 0
            text = render(s).decode()
            assert f'prefixcache_disk_hit_blocks_total{{worker="{w}"}}' in text
            assert 'tier="disk"' in text
            index.close()
        finally:
            c.shutdown()


def test_warm_command_pins_a_files_prompts(ray_local, tmp_path, capsys):
    """`prefixcache warm FILE` against a running service, as an operator runs it."""
    c = Cluster.start(workers=1, service="t-warm", **FAST)
    try:
        prompts = tmp_path / "prompts.jsonl"
        lines = [{"prompt": SYSTEM}, {"prompt": "short"}, {"prompt": SYSTEM + "!", "cache_salt": "s1"}, "not json"]
        prompts.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
        assert cli(["warm", str(prompts), "--service", "t-warm"]) == 1  # two lines could not be pinned
        out, err = capsys.readouterr()
        assert "4 prompts: 2 pinned" in out
        assert "line 2: not pinned" in err and "line 4: invalid JSON" in err
        blocks = len(SYSTEM.encode()) // 16
        [r] = c.generate([SYSTEM + "x"], max_new_tokens=1)
        assert r.cached_tokens == blocks * 16
        [salted] = c.generate([SYSTEM + "y"], max_new_tokens=1, cache_salt="s1")
        assert salted.cached_tokens == blocks * 16  # pinned under its own salt
        worker = c.stats()["workers"]["worker-0"]
        assert worker["device_tier"]["pinned"] + worker["host_tier"]["pinned"] == 2 * blocks  # both prompts
    finally:
        c.shutdown()
