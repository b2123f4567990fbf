"""The simulator at 8-256 workers on traces: a JSON of every result and a plot of hit rate vs workers.

    python -m cluster.bench.simulate_sweep --trace ../shared/traces/mooncake_synthetic_trace.jsonl
    python -m cluster.bench.simulate_sweep --trace ../shared/traces/mooncake_synthetic_trace.jsonl \
        --trace conv:1:12000 --trace conv:2:4000 --total 0 --out bench-results-simulate-conv.json \
        --plot bench-plots/sim_conv_hit_rate_vs_workers.png   # issue 23

A trace is a Mooncake-format file or `conv:SEED:REQUESTS` (cluster.simulate.conversations).

Two capacity regimes, because they answer different questions: a fixed cache per worker (the
goal's 1,500 blocks; at 64+ workers the cluster holds the whole working set, so only placement
and duplicates can lose hits), and a fixed total (the cluster's cache is smaller than the working
set at every size, so every duplicate copy costs a distinct block).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cache_store import CacheConfig  # noqa: E402
from cluster.simulate import BOUND, POLICY_NAMES, open_trace, simulate  # noqa: E402

WORKERS = (8, 16, 64, 256)


def sweep(trace, per_worker: int | None, total: int | None, eviction: str, policies=POLICY_NAMES) -> dict[int, dict]:
    out = {}
    for n in WORKERS:
        cap = per_worker if per_worker is not None else max(1, total // n)
        t0 = time.perf_counter()
        res = simulate(trace, workers=n, capacity_blocks=cap, eviction=eviction, policies=policies)
        out[n] = {"capacity_blocks": cap, "seconds": time.perf_counter() - t0} | {
            k: r.to_dict() for k, r in res.items()
        }
        print(f"{n} workers x {cap} blocks: " + ", ".join(f"{k} {r.hit_rate:.1%}" for k, r in res.items()), flush=True)
    return out


def plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (label, runs) in zip(axes[0], results.items()):
        ns = sorted(runs)
        for policy in (p for p in (BOUND, "cache_aware", "least_loaded", "round_robin") if p in runs[ns[0]]):
            ax.plot(ns, [100 * runs[n][policy]["hit_rate"] for n in ns], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("workers")
        ax.set_ylabel("token hit rate (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, action="append", help="repeat for several traces")
    p.add_argument("--per-worker", type=int, default=1500)
    p.add_argument("--total", type=int, default=24_000, help="0: skip the fixed-total regime")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated routing policies")
    p.add_argument("--eviction", default=CacheConfig.eviction)
    p.add_argument("--out", default="bench-results-simulate.json")
    p.add_argument("--plot", default="bench-plots/sim_hit_rate_vs_workers.png")
    args = p.parse_args()
    policies = args.policies.split(",")
    t0 = time.perf_counter()
    results = {}
    for spec in args.trace:
        trace = open_trace(spec)
        name = Path(spec).name if Path(spec).exists() else spec
        results[f"{name}, {args.per_worker} blocks per worker"] = sweep(
            trace, args.per_worker, None, args.eviction, policies
        )
        if args.total:
            results[f"{name}, {args.total:,} blocks in total"] = sweep(trace, None, args.total, args.eviction, policies)
    meta = {"traces": args.trace, "eviction": args.eviction, "seconds": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, Path(args.plot))
    print(f"done in {meta['seconds']:.0f} s: {args.out}, {args.plot}")


if __name__ == "__main__":
    main()
