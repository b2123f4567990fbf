"""CPU time one router replica (the `RouterService` Ray actor) spends per request, in a real service.

    python -m cluster.bench.router_actor_cpu [--requests 300] [--out bench-results-router-actor.json]

`router_capacity` times the `Router` class alone; this adds what the actor around it costs (Ray's
call handling, the forwarding to a worker, the background loops). It starts a local service (2
demo workers, 1 router), sends requests sharing a system prompt with 32 in flight, and reads the
router process's CPU time (psutil) before and after: CPU seconds per request is what bounds one
replica on one core, whatever the workers' speed. The idle rate (background loops) is measured
first and subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import time

SYSTEM = "A shared system prompt for the router actor benchmark, about two hundred characters long. " * 3
TOKENS = (1, 16, 64)


def cpu_s(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure(cluster, proc, tokens: int, n: int) -> dict:
    from worker.request import Request

    reqs = [Request(SYSTEM + f"question {i}?", max_new_tokens=tokens) for i in range(n)]
    c0, w0 = cpu_s(proc), time.perf_counter()
    results = [r for _, r in cluster.submit(reqs, window=32)]
    c1, w1 = cpu_s(proc), time.perf_counter()
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return {"max_new_tokens": tokens, "requests": n, "wall_s": w1 - w0, "cpu_s": c1 - c0}


def main() -> None:
    import psutil
    import ray

    from cluster import Cluster
    from cluster.service.lookup import find_router

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--out", default="bench-results-router-actor.json")
    args = p.parse_args()
    with Cluster.start(workers=2, model="demo", service="bench-router-actor", num_cpus=6) as cluster:
        pid = ray.get(find_router(cluster.service).__ray_call__.remote(lambda _self: os.getpid()))
        proc = psutil.Process(pid)
        cluster.generate([SYSTEM + "warm-up"], max_new_tokens=2)
        c0 = cpu_s(proc)
        time.sleep(5)
        idle = (cpu_s(proc) - c0) / 5
        rows = [measure(cluster, proc, t, args.requests) for t in TOKENS]
    for r in rows:
        r["cpu_ms_per_request"] = 1e3 * (r["cpu_s"] - idle * r["wall_s"]) / r["requests"]
        print(json.dumps(r), flush=True)
    out = {"idle_cpu_ms_per_s": 1e3 * idle, "window": 32, "workers": 2, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
