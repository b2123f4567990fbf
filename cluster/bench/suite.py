"""`prefixcache bench`: every workload through every mode in one run; writes BENCHMARKS.md and plots.

Workloads: shared system prompts (Zipf popularity, short questions), multi-turn chats, no sharing,
and a prefix-length sweep. Modes: (a) plain transformers, (b) the transformers prompt-cache recipe,
(c) per-worker caches behind round robin, (d) this service, (e) (d) with a device tier too small so
the host tier serves. In-process modes run with one torch thread, the compute one worker gets.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from cache_store import GIB, CacheConfig
from worker.demo_model import demo_block_bytes

BLOCK = CacheConfig.block_size  # the service's default, which every benchmark cluster runs with
BLOCK_BYTES = demo_block_bytes(BLOCK)
SWEEP_SUFFIX = 64  # user suffix after the cached prefix: a short question after a system prompt


@dataclass(frozen=True)
class Sizes:
    systems: int
    min_chars: int
    max_chars: int
    questions: int
    question_chars: int
    new_tokens: int
    chats: int
    turns: int
    cold_n: int
    cold_chars: int
    sweep: tuple[int, ...]
    workers: tuple[int, ...]


QUICK = Sizes(4, 500, 900, 24, 40, 8, 3, 3, 6, 500, (0, 256, 512, 1024, 1536), (1, 2))
FULL = Sizes(8, 1000, 2000, 96, 48, 16, 4, 4, 16, 1024, (0, 512, 1024, 1536, 2048, 3072, 4096), (1, 2, 4))


def run_suite(quick: bool, out_dir: Path, *, sizes: Sizes | None = None, only: str | None = None, log=print) -> dict:
    from cluster.bench import batching, report

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    previous = out_dir / "bench-results.json"
    results: dict = json.loads(previous.read_text()) if only and previous.is_file() else {}
    command = " ".join(["prefixcache bench", *(["--quick"] if quick else []), *(["--only", only] if only else [])])
    if only in (None, "service"):
        part_started = time.time()
        results.update(_service_part(quick, sizes or (QUICK if quick else FULL), log))
        results["run"] = _run_record(command, part_started)
    if only in (None, "batching"):
        part_started = time.time()
        log("batching: one engine per mode, in a fresh process (see batching.run_isolated) ...")
        results["batching"] = batching.run_isolated(batching.QUICK_BATCH if quick else batching.BatchSizes())
        results["batching"]["machine"] = machine()
        results["batching"]["run"] = _run_record(command, part_started)
    results["elapsed_s"] = time.time() - started
    previous.write_text(json.dumps(results, indent=1, default=str))
    if "service" in results:
        report.write(results, out_dir)
    log(f"benchmarks done in {results['elapsed_s']:.0f}s: {out_dir / 'BENCHMARKS.md'}")
    return results


def _run_record(command: str, started: float) -> dict:
    """Which command made a part's numbers, when, and in how long (the report's header says it)."""
    return {"command": command, "date": time.strftime("%Y-%m-%d"), "minutes": (time.time() - started) / 60}


def _service_part(quick: bool, size: Sizes, log) -> dict:
    import ray

    from worker.names import NAMESPACE

    results: dict = {"sizes": asdict(size), "quick": quick, "machine": machine()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results["inproc"] = inprocess(size, log)
    finally:
        torch.set_num_threads(threads)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(
            num_cpus=max(4, max(size.workers) + 1), include_dashboard=False, log_to_driver=False, namespace=NAMESPACE
        )
    try:
        results["service"] = service_modes(size, log)
    finally:
        if own_ray:
            ray.shutdown()
    return results


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform.processor()
    import ray
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / GIB, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def shared_workload(size: Sizes, cache_salt: str | None = None):
    """The shared-system-prompt workload. One definition: every mode, in-process or service, must see
    the same prompts (seed 1); only the salt differs, so service modes never hit each other's blocks."""
    from cluster.bench.workload import shared_prompts

    return shared_prompts(
        size.questions,
        size.systems,
        min_chars=size.min_chars,
        max_chars=size.max_chars,
        question_chars=size.question_chars,
        max_new_tokens=size.new_tokens,
        seed=1,
        cache_salt=cache_salt,
    )


# ---- in-process ------------------------------------------------------------------------------


def inprocess(size: Sizes, log) -> dict:
    from cluster.bench.inproc import Plain, Recipe, engine_sample, suffix_limit
    from cluster.bench.workload import cold
    from worker.engine import Engine

    engine = Engine.from_pretrained("demo", device="cpu", device_cache_gb=2.0, host_cache_gb=0)
    model, tok = engine.model, engine.tokenizer
    plain, recipe = Plain(model), Recipe(model)
    wl = shared_workload(size)
    out: dict = {}

    log("in-process: (a) plain transformers and (b) the prompt-cache recipe on shared system prompts ...")
    a, b, limits = [], [], []
    for req, p in zip(wl.requests, wl.prefix_of):
        system = tok(wl.prefixes[p])["input_ids"]
        suffix = tok(req.prompt[len(wl.prefixes[p]) :])["input_ids"]
        a.append(plain.run(system + suffix, size.new_tokens))
        b.append(recipe.run(system, suffix, size.new_tokens))
        limits.append(suffix_limit(model, system, suffix, repeats=1))
    out["shared"] = {"a": _rows(a), "b": _rows(b), "limit_s": limits, "b_memory_bytes": recipe.memory_bytes()}

    log("in-process: (a) on the cold workload, against the Engine (the cache's own overhead) ...")
    cw = cold(size.cold_n, size.cold_chars, max_new_tokens=size.new_tokens, seed=2)
    pa, pe = [], []
    for req in cw.requests:
        ids = tok(req.prompt)["input_ids"]
        pa.append(plain.run(ids, size.new_tokens))
        pe.append(engine_sample(engine, ids, size.new_tokens))
    out["cold"] = {"a": _rows(pa), "engine": _rows(pe)}

    log(f"in-process: prefix length sweep {list(size.sweep)} ...")
    rng = random.Random(4)
    sweep = []
    for n in size.sweep:
        prefix = [rng.randrange(256) for _ in range(n)]
        suffixes = [[rng.randrange(256) for _ in range(SWEEP_SUFFIX)] for _ in range(4)]
        plain_s = min(plain.run(prefix + suffixes[0], 1).ttft_s for _ in range(2))
        engine_sample(engine, prefix + suffixes[0], 1)  # warm the cache with the prefix
        cached = [engine_sample(engine, prefix + s, 1) for s in suffixes[1:]]
        limit = suffix_limit(model, prefix, suffixes[1]) if n else plain_s
        sweep.append(
            {
                "prefix_tokens": n,
                "plain_ttft_s": plain_s,
                "cached_ttft_s": min(c.ttft_s for c in cached),
                "cached_tokens": cached[0].cached_tokens,
                "limit_s": limit,
            }
        )
    out["sweep"] = sweep
    engine.close()
    return out


# ---- service ------------------------------------------------------------------------------------


def service_modes(size: Sizes, log) -> dict:
    """(d), (c) and (e) through the real service, then hit rate and throughput by worker count."""
    working_set = sum(len(p) // BLOCK for p in shared_workload(size, "x").prefixes)  # blocks (byte tokenizer)
    # Every mode gets the same total cache: 1.5x the system prompts. Split over 2 workers that is 0.75x
    # each: enough for each worker's share when prompts stick to workers, too little for all of them.
    total_gb = 1.5 * working_set * BLOCK_BYTES / GIB
    modes = _two_worker_modes(size, total_gb / 2, log)
    modes["e"] = _host_tier_mode(size, total_gb / 2, log)
    workers = {"2": _hit_and_rate(modes["d"])}
    for n in size.workers:
        if str(n) not in workers:
            workers[str(n)] = _same_total_cache(n, size, total_gb, log)
    return {"working_set_blocks": working_set, "total_cache_gb": total_gb, "modes": modes, "workers": workers}


def _two_worker_modes(size: Sizes, per_worker_gb: float, log) -> dict:
    """(d), then (c) on the same workers: each mode's own salts keep (d)'s blocks from serving (c)."""
    from cluster.service.client import Cluster

    log("service: 2 workers, (d) cache-aware, then (c) round robin with per-worker caches ...")
    two = Cluster.start(workers=2, service="bench-2", device_cache_gb=per_worker_gb, host_cache_gb=0)
    try:
        modes = {"d": _mode(two, size, "d", 2)}
        two.set_policy("round_robin")
        modes["c"] = _mode(two, size, "c", 2)
    finally:
        two.shutdown()
    return modes


def _host_tier_mode(size: Sizes, per_worker_gb: float, log) -> dict:
    from cluster.service.client import Cluster

    log("service: (e) a device tier a quarter of that, the host tier holding the rest ...")
    # The device tier is also the running requests' KV memory: it must hold the 2 that run on each
    # worker at once, whatever the quarter is.
    longest = max(len(r.prompt) + r.max_new_tokens for r in shared_workload(size, "e").requests)
    running_gb = 2 * (longest // BLOCK + 2) * BLOCK_BYTES / GIB
    small = Cluster.start(
        workers=2,
        service="bench-host",
        device_cache_gb=max(per_worker_gb / 4, running_gb),
        host_cache_gb=per_worker_gb,
    )
    try:
        return _mode(small, size, "e", 2)
    finally:
        small.shutdown()


def _same_total_cache(n: int, size: Sizes, total_gb: float, log) -> dict:
    """Hit rate and throughput of `n` workers sharing `total_gb` of cache, shared system prompts only."""
    from cluster.bench.modes import run_through
    from cluster.service.client import Cluster

    log(f"service: {n} worker(s) with the same total cache ...")
    c = Cluster.start(workers=n, service=f"bench-{n}w", device_cache_gb=total_gb / n, host_cache_gb=0)
    try:
        samples, _, wall = run_through(c, shared_workload(size, f"w{n}").requests, 2 * n)
        return _hit_and_rate({"shared": _rows(samples), "shared_wall_s": wall})
    finally:
        c.shutdown()


def _mode(cluster, size: Sizes, key: str, n_workers: int) -> dict:
    """One service mode through all three workloads, two requests in flight per worker; `key` salts them."""
    from cluster.bench.modes import run_chats, run_through, tier_bytes
    from cluster.bench.workload import cold

    samples, _, wall = run_through(cluster, shared_workload(size, key).requests, 2 * n_workers)
    chat_samples, chat_wall = run_chats(
        cluster, size.chats, size.turns, salt=key + "-chat", max_new_tokens=size.new_tokens, seed=3
    )
    cw = cold(size.cold_n, size.cold_chars, max_new_tokens=size.new_tokens, seed=2, cache_salt=key + "-cold")
    cold_samples, _, cold_wall = run_through(cluster, cw.requests, 2 * n_workers)
    return {
        "shared": _rows(samples),
        "shared_wall_s": wall,
        "chats": _rows(chat_samples),
        "chats_wall_s": chat_wall,
        "cold": _rows(cold_samples),
        "cold_wall_s": cold_wall,
        "memory": tier_bytes(cluster),
    }


def _rows(samples) -> list[dict]:
    return [asdict(s) for s in samples]


def _hit_and_rate(m: dict) -> dict:
    rows = m["shared"]
    prompt = sum(r["prompt_tokens"] for r in rows)
    return {
        "hit_rate": sum(r["cached_tokens"] for r in rows) / prompt,
        "req_per_s": len(rows) / m["shared_wall_s"],
        "tok_per_s": sum(r["new_tokens"] for r in rows) / m["shared_wall_s"],
    }
