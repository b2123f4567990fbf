"""Eviction orders compared through the real service: LRU, unbounded SLRU and bounded SLRU, each with
2 workers (cache-aware, peer fetch) against one worker holding the same total cache.

    python -m cluster.bench.eviction [--quick] [--out bench-results-eviction.json]

Same workloads, sizes and total cache as `prefixcache bench` (shared system prompts, then multi-turn
chats on the cache those left behind: the sequence that starved chats under unbounded SLRU), so its
rows compare with BENCHMARKS.md's (d) and the 1-worker row of its Workers table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EVICTIONS = ("lru", "slru", "bounded_slru")


def hit_rate(samples) -> float:
    prompt = sum(s.prompt_tokens for s in samples)
    return sum(s.cached_tokens for s in samples) / prompt if prompt else 0.0


def one_run(size, eviction: str, workers: int, total_gb: float) -> dict:
    from cluster.bench.modes import run_chats, run_through
    from cluster.bench.suite import shared_workload
    from cluster.service.client import Cluster

    key = f"ev-{eviction}-{workers}"
    c = Cluster.start(
        workers=workers, service=f"bench-{key}", device_cache_gb=total_gb / workers, host_cache_gb=0, eviction=eviction
    )
    try:
        shared, _, wall = run_through(c, shared_workload(size, key).requests, 2 * workers)
        chat, _ = run_chats(c, size.chats, size.turns, salt=key + "-chat", max_new_tokens=size.new_tokens, seed=3)
    finally:
        c.shutdown()
    return {"shared_hit_rate": hit_rate(shared), "chat_hit_rate": hit_rate(chat), "shared_wall_s": wall}


def eviction_modes(size, log=print, evictions=None, workers=None) -> dict:
    from cache_store import GIB
    from cluster.bench.suite import BLOCK, BLOCK_BYTES, shared_workload

    working_set = sum(len(p) // BLOCK for p in shared_workload(size, "x").prefixes)
    total_gb = 1.5 * working_set * BLOCK_BYTES / GIB  # as service_modes: 1.5x the system prompts
    out: dict = {"total_cache_gb": total_gb, "runs": {}}
    for ev in evictions or EVICTIONS:
        for n in workers or (1, 2):
            log(f"eviction {ev}: {n} worker(s) ...")
            out["runs"][f"{ev}/{n}"] = one_run(size, ev, n, total_gb)
    return out


def table(res: dict) -> str:
    rows = [
        "| eviction | (d) 2 workers: shared prompts hit rate | 1 worker, same total cache | (d) vs one shared cache "
        "| chats after, 2 workers | chats, 1 worker |",
        "|---|---|---|---|---|---|",
    ]
    for ev in EVICTIONS:
        two, one = res["runs"][f"{ev}/2"], res["runs"][f"{ev}/1"]
        rows.append(
            f"| {ev} | {two['shared_hit_rate']:.1%} | {one['shared_hit_rate']:.1%} "
            f"| {two['shared_hit_rate'] / one['shared_hit_rate']:.1%} | {two['chat_hit_rate']:.1%} "
            f"| {one['chat_hit_rate']:.1%} |"
        )
    return "\n".join(rows)


def main() -> None:
    import ray

    from cluster.bench.suite import FULL, QUICK
    from worker.names import NAMESPACE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-results-eviction.json")
    p.add_argument("--only", action="append", choices=EVICTIONS, help="run these evictions only (repeatable)")
    p.add_argument("--workers", type=int, action="append", choices=(1, 2), help="only these worker counts")
    args = p.parse_args()
    t0 = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE)
    try:
        res = eviction_modes(QUICK if args.quick else FULL, evictions=args.only, workers=args.workers)
    finally:
        ray.shutdown()
    res["elapsed_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(table(res) if len(res["runs"]) == 2 * len(EVICTIONS) else json.dumps(res["runs"], indent=1))
    print(f"done in {res['elapsed_s'] / 60:.1f} min: {args.out}")


if __name__ == "__main__":
    main()
