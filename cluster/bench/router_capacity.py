"""Placements per second of one `Router` with a real index (embedded Valkey): tokenize + hash chain +
one `holders()` round trip + the cache-aware decision, at 16 to 1,000 workers.

    python -m cluster.bench.router_capacity [--workers 16 --workers 256 --workers 1000] [--seconds 10]

Prompts are 2k-token chats on 64 system prompts, each system prompt published by 2 of the workers,
with 2 requests in flight per worker (the oldest finishes when a new one is placed), so the
policy sees holders, load and predictions as in service. One thread: the router actor runs
`prepare`/`place` in threads of one Python process, so one core is what it gets.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque

from cache_store import CacheConfig, EmbeddedRedis, MetadataIndex, block_chain, root_hash
from cluster.policies import make_policy
from cluster.router import Router
from worker.models import load_tokenizer
from worker.request import Request

BLOCK = CacheConfig.block_size
SYSTEMS = 64
FINGERPRINT = "router-capacity"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def setup(url: str, workers: int, tokenizer, rng: random.Random) -> tuple[Router, list[str]]:
    index = MetadataIndex(url, CacheConfig(service=f"rc{workers}", lease_ttl_s=3600.0, heartbeat_s=60.0))
    ids = [f"w{i:04d}" for i in range(workers)]
    gens = {w: index.register(w) for w in ids}
    systems = ["".join(rng.choice("abcdefghij klmnop") for _ in range(1900)) for _ in range(SYSTEMS)]
    for text in systems:
        chain = block_chain(root_hash(FINGERPRINT, None), tokenizer(text)["input_ids"], BLOCK)
        for w in rng.sample(ids, 2):
            index.publish(w, gens[w], [("add", h, "device") for h in chain])
    router = Router(
        tokenizer=tokenizer,
        fingerprint=FINGERPRINT,
        block_size=BLOCK,
        max_context=1 << 20,
        vocab_size=1 << 20,
        index=index,
        policy=make_policy("cache_aware"),
        workers=ids,
    )
    return router, systems


def measure(router: Router, systems: list[str], rng: random.Random, seconds: float) -> dict:
    inflight: deque = deque()
    lat, t_prep, t_place = [], [], []
    end = time.perf_counter() + seconds
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
    total = sum(lat)
    return {
        "placements": len(lat),
        "placements_per_s": len(lat) / total,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "tokenize_hash_p50_ms": pct(t_prep, 50) * 1e3,
        "place_p50_ms": pct(t_place, 50) * 1e3,
        "place_p99_ms": pct(t_place, 99) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, action="append")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", default="bench-results-router.json")
    args = p.parse_args()
    tokenizer = load_tokenizer("demo")
    out = {}
    with EmbeddedRedis() as server:
        for n in args.workers or [16, 256, 1000]:
            rng = random.Random(n)
            router, systems = setup(server.url, n, tokenizer, rng)
            out[str(n)] = measure(router, systems, rng, args.seconds)
            print(n, "workers:", json.dumps(out[str(n)]), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
