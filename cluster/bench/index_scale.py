"""The metadata index at cluster scale: one Valkey on this machine, 1,000 simulated workers.

    python -m cluster.bench.index_scale --entries 1000000 [--entries 10000000] [--out FILE.json]

Measures, through the real `MetadataIndex` (no shortcuts around it):
  publish     entries/s of `publish` from one client, one call per (worker, 2k-token prompt) = 128 events
  memory      server `used_memory` per block entry (block hash entry + the worker's purge-set member)
  holders     p50/p99 of `holders()` for a 2k-token prompt (128 blocks of 16 tokens) held by 2 workers,
              and for a prompt nobody holds
  expiry      100 workers stop heart-beating at once: time until `holders()` stops naming them, and
              how long `reap_dead()` takes to purge their entries
Each prompt is held by 2 workers, so entries = 2 x 128 x prompts; hashes are random 16-byte values
(the index never looks inside them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from cache_store import CacheConfig, EmbeddedRedis, MetadataIndex

WORKERS = 1000
DEAD = 100
CHAIN = 128  # 2,048 tokens at 16-token blocks
HOLDERS_PER_PROMPT = 2
LIVE = CacheConfig(service="scale", lease_ttl_s=3600.0, heartbeat_s=60.0)
DYING = CacheConfig(service="scale", lease_ttl_s=2.0, heartbeat_s=1.0)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def used_memory(index: MetadataIndex) -> int:
    return int(index._r.info("memory")["used_memory"])  # bench only: a server stat, not index data


def register_all(index: MetadataIndex) -> dict[str, int]:
    return {f"w{i:04d}": index.register(f"w{i:04d}") for i in range(WORKERS)}


def fill(index: MetadataIndex, gens: dict[str, int], entries: int, rng: random.Random, log) -> tuple[list, float]:
    """Publish prompts until `entries` block entries exist; returns (prompts, entries per second)."""
    workers = list(gens)
    prompts = []
    done, t0 = 0, time.perf_counter()
    while done < entries:
        chain = [rng.randbytes(16) for _ in range(CHAIN)]
        holders = rng.sample(workers, HOLDERS_PER_PROMPT)
        for w in holders:
            index.publish(w, gens[w], [("add", h, "device") for h in chain])
        prompts.append((chain, holders))
        done += CHAIN * HOLDERS_PER_PROMPT
        if len(prompts) % 2000 == 0:
            log(f"  {done:,} entries, {done / (time.perf_counter() - t0):,.0f}/s")
    return prompts, done / (time.perf_counter() - t0)


def time_holders(index: MetadataIndex, prompts: list, rng: random.Random, n: int = 2000) -> dict:
    hit, miss = [], []
    for _ in range(n):
        chain, holders = rng.choice(prompts)
        t = time.perf_counter()
        got = index.holders(chain)
        hit.append(time.perf_counter() - t)
        assert {h.worker_id for h in got} >= set(holders) - DEAD_SET and all(h.blocks == CHAIN for h in got)
        fresh = [rng.randbytes(16) for _ in range(CHAIN)]
        t = time.perf_counter()
        index.holders(fresh)
        miss.append(time.perf_counter() - t)
    ms = 1e3
    return {
        "hit_p50_ms": pct(hit, 50) * ms,
        "hit_p99_ms": pct(hit, 99) * ms,
        "miss_p50_ms": pct(miss, 50) * ms,
        "miss_p99_ms": pct(miss, 99) * ms,
    }


DEAD_SET: set[str] = set()


def expire(url: str, index: MetadataIndex, gens: dict[str, int], prompts: list) -> dict:
    """100 workers' leases get a 2 s TTL at once (their last heartbeat); time until they stop counting."""
    dying_index = MetadataIndex(url, DYING)
    doomed = sorted(gens)[:DEAD]
    probe = next(c for c, hs in prompts if set(hs) & set(doomed))
    for w in doomed:
        dying_index.heartbeat(w, gens[w], {})
    t0 = time.perf_counter()
    while any(h.worker_id in doomed for h in index.holders(probe)):
        time.sleep(0.01)
    gone = time.perf_counter() - t0
    DEAD_SET.update(doomed)
    t1 = time.perf_counter()
    reaped = index.reap_dead()
    reap_s = time.perf_counter() - t1
    left = sum(1 for c, hs in prompts[:500] for h in index.holders(c) if h.worker_id in doomed)
    return {
        "lease_ttl_s": DYING.lease_ttl_s,
        "unrouted_after_s": gone,
        "reaped_workers": len(reaped),
        "reap_s": reap_s,
        "entries_purged_per_s": sum(CHAIN for _, hs in prompts for w in hs if w in doomed) / reap_s,
        "left_after_reap": left,
    }


def run(entries: int, log=print) -> dict:
    rng = random.Random(13)
    with EmbeddedRedis() as server:
        index = MetadataIndex(server.url, LIVE)
        gens = register_all(index)
        base = used_memory(index)
        log(f"{entries:,} entries over {WORKERS} workers ...")
        prompts, rate = fill(index, gens, entries, rng, log)
        mem = used_memory(index) - base
        n = len(prompts) * CHAIN * HOLDERS_PER_PROMPT
        DEAD_SET.clear()
        holders = time_holders(index, prompts, rng)
        expiry = expire(server.url, index, gens, prompts)
        return {
            "entries": n,
            "workers": WORKERS,
            "publish_entries_per_s": rate,
            "used_memory_bytes": mem,
            "bytes_per_entry": mem / n,
            "holders": holders,
            "expiry": expiry,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, action="append", help="block entries (repeatable); default 1,000,000")
    p.add_argument("--out", default="bench-results-index.json")
    args = p.parse_args()
    out = {"cpu_cores": os.cpu_count(), "runs": []}
    for n in args.entries or [1_000_000]:
        res = run(n)
        print(json.dumps(res, indent=1), flush=True)
        out["runs"].append(res)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
