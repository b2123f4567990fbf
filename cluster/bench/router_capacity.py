"""Placements per second of one `Router` with a real index (embedded Valkey): tokenize + hash chain +
one `holders()` round trip + the cache-aware decision, at 16 to 1,000 workers.

    python -m cluster.bench.router_capacity [--workers 16 --workers 256 --workers 1000] [--seconds 10]
        [--replicas 1 --replicas 2]

Prompts are 2k-token chats on 64 system prompts, each system prompt published by 2 of the workers,
with 2 requests in flight per worker (the oldest finishes when a new one is placed), so the
policy sees holders, load and predictions as in service. One thread: the router actor runs
`prepare`/`place` in threads of one Python process, so one core is what it gets.

`--replicas N` (N > 1) runs N routers as N processes (spawned), each with its own tokenizer and
in-flight counts on the same index, each the same closed loop for `--seconds`, started together:
what N replicas place together on this machine (which has 2 cores, shared with Valkey). Results
of one replica are the fields of `out[workers]` as before; N > 1 adds `out[workers]["replicas"][N]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import time
from collections import deque

from cache_store import CacheConfig, EmbeddedRedis, MetadataIndex, block_chain, root_hash
from cluster.routing.policies import make_policy
from cluster.routing.router import Router
from worker.models import load_tokenizer
from worker.request import Request

BLOCK = CacheConfig.block_size
SYSTEMS = 64
FINGERPRINT = "router-capacity"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def worker_ids(workers: int) -> list[str]:
    return [f"w{i:04d}" for i in range(workers)]


def open_index(url: str, workers: int) -> MetadataIndex:
    return MetadataIndex(url, CacheConfig(service=f"rc{workers}", lease_ttl_s=3600.0, heartbeat_s=60.0))


def populate(url: str, workers: int, tokenizer, rng: random.Random) -> list[str]:
    """Register the workers and publish each system prompt on 2 of them, once for all replicas;
    returns the system prompts."""
    index = open_index(url, workers)
    ids = worker_ids(workers)
    gens = {w: index.register(w) for w in ids}
    systems = ["".join(rng.choice("abcdefghij klmnop") for _ in range(1900)) for _ in range(SYSTEMS)]
    for text in systems:
        chain = block_chain(root_hash(FINGERPRINT, None), tokenizer(text)["input_ids"], BLOCK)
        for w in rng.sample(ids, 2):
            index.publish(w, gens[w], [("add", h, "device") for h in chain])
    return systems


def make_router(url: str, workers: int, tokenizer) -> Router:
    return Router(
        tokenizer=tokenizer,
        fingerprint=FINGERPRINT,
        block_size=BLOCK,
        max_context=1 << 20,
        vocab_size=1 << 20,
        index=open_index(url, workers),
        policy=make_policy("cache_aware"),
        workers=worker_ids(workers),
    )


def setup(url: str, workers: int, tokenizer, rng: random.Random) -> tuple[Router, list[str]]:
    systems = populate(url, workers, tokenizer, rng)
    return make_router(url, workers, tokenizer), systems


def measure(router: Router, systems: list[str], rng: random.Random, seconds: float) -> dict:
    inflight: deque = deque()
    lat, t_prep, t_place = [], [], []
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        req = Request(prompt=rng.choice(systems) + f" question {rng.randrange(10**9)}: " + "x" * 100)
        t0 = time.perf_counter()
        ids, chain = router.prepare(req)
        t1 = time.perf_counter()
        plan = router.place(ids, chain)
        t2 = time.perf_counter()
        lat.append(t2 - t0)
        t_prep.append(t1 - t0)
        t_place.append(t2 - t1)
        inflight.append(plan)
        if len(inflight) > 2 * len(router.workers):
            router.finished(inflight.popleft(), 0.5)
    total, wall = sum(lat), time.perf_counter() - start
    return {
        "placements": len(lat),
        "placements_per_s": len(lat) / total,
        "placements_per_wall_s": len(lat) / wall,  # with the loop's own work (finishing requests)
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "tokenize_hash_p50_ms": pct(t_prep, 50) * 1e3,
        "place_p50_ms": pct(t_place, 50) * 1e3,
        "place_p99_ms": pct(t_place, 99) * 1e3,
    }


def replica(url: str, workers: int, systems: list[str], seconds: float, seed: int, start, results) -> None:
    """One router replica in its own process: its own tokenizer and in-flight counts, the shared index."""
    router = make_router(url, workers, load_tokenizer("demo"))
    start.wait()  # every replica set up: the loops run side by side
    results.put(measure(router, systems, random.Random(seed), seconds))


def measure_replicas(url: str, workers: int, systems: list[str], seconds: float, n: int) -> dict:
    """`n` replicas at once: placements per second together, and each one's latencies."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=replica, args=(url, workers, systems, seconds, workers * 1000 + r, start, results))
        for r in range(n)
    ]
    for proc in procs:
        proc.start()
    each = [results.get(timeout=seconds + 600) for _ in procs]
    for proc in procs:
        proc.join()
    keep = ("placements", "placements_per_wall_s", "p50_ms", "p99_ms", "place_p50_ms", "place_p99_ms")
    return {
        "placements": sum(r["placements"] for r in each),
        "placements_per_s": sum(r["placements_per_wall_s"] for r in each),  # together, per wall second
        "per_replica": [{k: r[k] for k in keep} for r in each],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, action="append")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--replicas", type=int, action="append", help="router processes at once (default 1)")
    p.add_argument("--out", default="bench-results-router.json")
    args = p.parse_args()
    tokenizer = load_tokenizer("demo")
    out: dict[str, dict] = {}
    with EmbeddedRedis() as server:
        for n in args.workers or [16, 256, 1000]:
            rng = random.Random(n)
            systems = populate(server.url, n, tokenizer, rng)
            out[str(n)] = {}
            for replicas in args.replicas or [1]:
                if replicas == 1:
                    out[str(n)].update(measure(make_router(server.url, n, tokenizer), systems, rng, args.seconds))
                    print(n, "workers:", json.dumps(out[str(n)]), flush=True)
                else:
                    res = measure_replicas(server.url, n, systems, args.seconds, replicas)
                    out[str(n)].setdefault("replicas", {})[str(replicas)] = res
                    print(n, "workers,", replicas, "replicas:", json.dumps(res), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
