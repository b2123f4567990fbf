"""The disk tier measured: time to first token with the prefix on device, host, disk or nowhere;
the hit rate of the first 100 requests after a worker restart, with and without the disk tier; and
tiers too small for the working set while the disk holds it.

    python -m cluster.bench.disk [--quick] [--models demo smollm2] [--out bench-results-disk.json]
                                 [--report BENCHMARKS.md]

In-process Engines (no Ray), one request at a time, on this machine's CPU (or its GPU with
--device cuda). A restart is what a worker restart is: the engine closed (its disk writes flushed)
and a new one started on the same directory. "disk" TTFT reads slots written earlier with the page
cache dropped for the slab files first (posix_fadvise DONTNEED), i.e. from the device; the read
bandwidth is the disk tier's own counters (bytes over time spent in its read calls). With
--report, the "Disk tier" section of that file is replaced (or appended) with these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cache_store import counter_names as cn

LENGTHS = (512, 1024, 2048, 4096)
SUFFIX = 16  # uncached tokens after the prefix
SECTION = "## Disk tier (issue 21)"


def _engine(model: str, device: str, disk_dir: str | None, device_gb: float, host_gb: float, disk_gb: float):
    from worker.engine import Engine

    return Engine.from_pretrained(
        model,
        device=device,
        device_cache_gb=device_gb,
        host_cache_gb=host_gb,
        disk_cache_dir=disk_dir,
        disk_cache_gb=disk_gb,
    )


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, min(vocab, 30000)) for _ in range(n)]


def _ttft(engine, ids: list[int]) -> tuple[float, int]:
    from worker.request import Request

    r = engine.run(Request(ids, max_new_tokens=1))
    if not r.ok:
        raise RuntimeError(r.error)
    return r.ttft_s, r.cached_tokens


def _drop_page_cache(disk_dir: Path) -> None:
    """Evict the slab files' pages (written and synced by the closed engine) from the page cache."""
    for slab in disk_dir.rglob("slab-*.pkv"):
        fd = os.open(slab, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _to_host(engine) -> None:
    """Spill every unpinned device block to host: take the device tier as working slots, give them back."""
    store = engine.store
    slots = store.alloc_working(store.room())
    if slots:
        store.free_working(slots)


def ttft_by_tier(model: str, device: str, lengths, rounds: int, log) -> dict:
    """Per prefix length: best-of-`rounds` TTFT with the prefix recomputed, on device, on host, on disk."""
    root = Path(tempfile.mkdtemp(prefix="bench-disk-"))
    out: dict = {"rows": []}
    try:
        kv = root / "kv"
        gb = 2.0 if model == "demo" else 3.0
        engine = _engine(model, device, str(kv), gb, gb, 2 * gb)
        vocab = engine.loaded.vocab_size
        for n in lengths:
            t: dict[str, list[float]] = {"recompute": [], "device": [], "host": [], "disk": []}
            got: dict[str, int] = {}
            for r in range(rounds):
                prefix = _ids(n, seed=1000 * n + r, vocab=vocab)
                ids = prefix + _ids(SUFFIX, seed=7 + r, vocab=vocab)
                engine.reset_prefix_cache()
                for tier in ("recompute", "device"):
                    s, got[tier] = _ttft(engine, ids)
                    t[tier].append(s)
                _to_host(engine)
                s, got["host"] = _ttft(engine, ids)
                t["host"].append(s)
                engine.close()  # a restart: its blocks are on disk only in the next engine
                engine = _engine(model, device, str(kv), gb, gb, 2 * gb)
                _ttft(engine, _ids(4 * SUFFIX, seed=99 + r, vocab=vocab))  # a fresh engine's first request aside
                _drop_page_cache(kv)
                before = engine.store.stats().counters
                s, got["disk"] = _ttft(engine, ids)
                t["disk"].append(s)
                after = engine.store.stats().counters
            read_b = after.get(cn.DISK_READ_BYTES, 0) - before.get(cn.DISK_READ_BYTES, 0)
            read_us = after.get(cn.DISK_READ_US, 0) - before.get(cn.DISK_READ_US, 0)
            row = {"prefix_tokens": n, **{k: min(v) for k, v in t.items()}, "cached": got}
            row["read_gbps"] = read_b / read_us / 1e3 if read_us else 0.0
            row["disk_speedup"] = row["recompute"] / row["disk"] if row["disk"] else 0.0
            out["rows"].append(row)
            log(
                f"  {model} {n:>5} tokens: recompute {row['recompute'] * 1e3:.1f} ms, device {row['device'] * 1e3:.1f}, "
                f"host {row['host'] * 1e3:.1f}, disk {row['disk'] * 1e3:.1f} ({row['disk_speedup']:.1f}x), "
                f"read {row['read_gbps']:.2f} GB/s; cached {got}"
            )
        out["costs"] = engine.costs.to_dict(engine.block_size)
        engine.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _chat_workload(vocab: int, n: int, seed: int, prompts: int = 8, prefix_tokens: int = 768) -> list[list[int]]:
    """`n` requests over `prompts` shared system prompts of `prefix_tokens` (Zipf-ish popularity), each
    with its own 32-token question."""
    rng = random.Random(seed)
    systems = [_ids(prefix_tokens, seed=500 + i, vocab=vocab) for i in range(prompts)]
    weights = [1 / (i + 1) for i in range(prompts)]
    return [rng.choices(systems, weights)[0] + _ids(32, seed=seed * 100_000 + k, vocab=vocab) for k in range(n)]


def _hit_rate(engine, reqs) -> float:
    from worker.request import Request

    prompt = cached = 0
    for ids in reqs:
        r = engine.run(Request(ids, max_new_tokens=1))
        prompt, cached = prompt + r.prompt_tokens, cached + r.cached_tokens
    return cached / prompt if prompt else 0.0


def restart_hit_rates(model: str, device: str, n: int, log) -> dict:
    """Hit rate of `n` requests before a restart (after as many to warm up) and of the first `n`
    after it, with the disk tier and without."""
    out = {}
    for with_disk in (True, False):
        root = Path(tempfile.mkdtemp(prefix="bench-disk-"))
        try:
            kv = str(root / "kv") if with_disk else None
            engine = _engine(model, device, kv, 1.0, 1.0, 2.0)
            reqs = _chat_workload(engine.loaded.vocab_size, 3 * n, seed=11)
            _hit_rate(engine, reqs[:n])  # warm up
            before = _hit_rate(engine, reqs[n : 2 * n])
            engine.close()
            engine = _engine(model, device, kv, 1.0, 1.0, 2.0)
            after = _hit_rate(engine, reqs[2 * n :])
            engine.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        key = "with_disk" if with_disk else "without_disk"
        out[key] = {"before": before, "after": after}
        log(f"  {model} restart {key}: hit rate of {n} requests before {before:.1%}, first {n} after {after:.1%}")
    return out


def small_tiers(model: str, device: str, n: int, log) -> dict:
    """Device and host tiers that hold a fraction of the working set, with and without a disk tier
    under them, against a device tier that holds it all: hit rate and mean TTFT of `n` requests."""
    from cache_store import GIB, KVShape

    out = {}
    root = Path(tempfile.mkdtemp(prefix="bench-disk-"))
    try:
        probe = _engine(model, device, None, 0.05, 0.0, 1.0)
        vocab, lay, dtype = probe.loaded.vocab_size, probe.loaded.layout, probe.dtype
        bs = probe.block_size
        probe.close()
        bb = KVShape(lay.layers, lay.kv_heads, bs, lay.head_dim, dtype).block_bytes
        reqs = _chat_workload(vocab, n, seed=13)
        working = 8 * 768 // bs  # blocks of the system prompts
        small = 0.25 * working * bb / GIB  # a quarter of the working set each, device and host
        modes = {
            "device holds it all": (2.0 * working * bb / GIB, 0.0, None),
            "small device + host": (small, small, None),
            "small device + host + disk": (small, small, str(root / "kv")),
        }
        for name, (dev_gb, host_gb, kv) in modes.items():
            engine = _engine(model, device, kv, max(dev_gb, 32 * bb / GIB), host_gb, 1.0)
            from worker.request import Request

            ttfts, prompt, cached = [], 0, 0
            for ids in reqs:
                r = engine.run(Request(ids, max_new_tokens=1))
                ttfts.append(r.ttft_s)
                prompt, cached = prompt + r.prompt_tokens, cached + r.cached_tokens
            c = engine.store.stats().counters
            engine.close()
            out[name] = {
                "hit_rate": cached / prompt,
                "mean_ttft_s": statistics.fmean(ttfts),
                "p50_ttft_s": statistics.median(ttfts),
                "disk_hit_blocks": c.get(cn.DISK_READ_BLOCKS, 0),
                "disk_writes_dropped": c.get(cn.DISK_WRITES_DROPPED, 0),
            }
            log(f"  {model} {name}: hit rate {cached / prompt:.1%}, mean TTFT {out[name]['mean_ttft_s'] * 1e3:.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def report(res: dict) -> list[str]:
    """The BENCHMARKS.md section."""
    lines = [
        SECTION,
        "",
        f"`{res['command']}` on {res['date']} ({res['minutes']:.1f} minutes, {res['where']}). In-process engines, one "
        "request at a time, prompts of random token ids (prefix + 16 new tokens), best of "
        f"{res['rounds']} per cell. *disk*: a restarted engine reading slots written by the one before it, "
        "page cache dropped first; *host*: the prefix spilled to the host tier; *read GB/s*: the disk tier's "
        "bytes over the time spent in its read calls (checksums included).",
        "",
    ]
    for model, m in res["models"].items():
        lines += [
            f"### TTFT by tier, {model}",
            "",
            "| prefix tokens | recompute | device | host | disk | disk vs recompute | read GB/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in m["ttft"]["rows"]:
            lines.append(
                f"| {r['prefix_tokens']:,} | {r['recompute'] * 1e3:.1f} ms | {r['device'] * 1e3:.1f} ms "
                f"| {r['host'] * 1e3:.1f} ms | {r['disk'] * 1e3:.1f} ms | {r['disk_speedup']:.1f}x | {r['read_gbps']:.2f} |"
            )
        c = m["ttft"]["costs"]
        lines += [
            "",
            f"Measured at start-up: prefill {c['prefill_s_per_token'] * 1e3:.3f} ms/token, disk read "
            f"{c['disk_read_s_per_block'] * 1e3:.3f} ms/block + {c['disk_read_overhead_s'] * 1e3:.2f} ms per read: "
            f"reading pays from {c['disk_crossover_blocks']:.1f} block(s).",
            "",
            f"Restart, {model} (shared system prompts, {res['requests']} requests before and after):",
            "",
            "| | hit rate before the restart | first requests after it |",
            "|---|---|---|",
        ]
        for key, v in m["restart"].items():
            lines.append(f"| {key.replace('_', ' ')} | {v['before']:.1%} | {v['after']:.1%} |")
        lines += [
            "",
            f"Tiers smaller than the working set, {model} (8 system prompts of 768 tokens; device and host a quarter of it each):",
            "",
            "| mode | hit rate | mean TTFT | p50 TTFT | disk hit blocks | dropped writes |",
            "|---|---|---|---|---|---|",
        ]
        for name, v in m["small_tiers"].items():
            lines.append(
                f"| {name} | {v['hit_rate']:.1%} | {v['mean_ttft_s'] * 1e3:.1f} ms | {v['p50_ttft_s'] * 1e3:.1f} ms "
                f"| {v['disk_hit_blocks']:,} | {v['disk_writes_dropped']:,} |"
            )
        lines.append("")
    lines += _goal_lines(res)
    return lines


def _goal_lines(res: dict) -> list[str]:
    out = ["Goals (reported, not asserted):", ""]
    for model, m in res["models"].items():
        at2k = next((r for r in m["ttft"]["rows"] if r["prefix_tokens"] == 2048), None)
        if at2k:
            verdict = "met" if at2k["disk_speedup"] >= 3 else "not met"
            out.append(
                f"- {model}: disk hit at 2k tokens {at2k['disk_speedup']:.1f}x faster than recompute (goal 3x: {verdict})"
            )
        r = m["restart"]["with_disk"]
        gap = 100 * (r["before"] - r["after"])
        out.append(
            f"- {model}: after a restart the hit rate is {gap:.1f} points below before it "
            f"(goal within 5: {'met' if gap <= 5 else 'not met'}); without the disk tier "
            f"{100 * (m['restart']['without_disk']['before'] - m['restart']['without_disk']['after']):.1f} points"
        )
    out.append(
        "- wrong-KV events in the fault tests: 0 (tests/worker/test_disk_tier.py, tests/cache_store/test_disk.py)"
    )
    return out + [""]


def write_section(path: Path, lines: list[str]) -> None:
    """Replace this benchmark's section of `path` (up to the next '## ' heading), or append it."""
    text = path.read_text() if path.exists() else ""
    body = "\n".join(lines) + "\n"
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        text = head + body + (rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="512 and 1k tokens, 1 round, 20 requests")
    p.add_argument("--models", nargs="+", default=["demo", "smollm2"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--where", default="shared 2-core machine, other jobs running", help="what ran it (for the report)")
    p.add_argument("--out", default="bench-results-disk.json")
    p.add_argument("--report", default=None, help="BENCHMARKS.md to write the section into")
    args = p.parse_args()
    t0 = time.time()
    lengths, rounds, n = (LENGTHS[:2], 1, 20) if args.quick else (LENGTHS, 2, 100)
    res: dict = {"models": {}, "rounds": rounds, "requests": n, "where": args.where}
    for model in args.models:
        print(f"{model}: TTFT by tier ...", flush=True)
        m = {"ttft": ttft_by_tier(model, args.device, lengths, rounds, print)}
        print(f"{model}: restart ...", flush=True)
        m["restart"] = restart_hit_rates(model, args.device, n, print)
        print(f"{model}: small tiers ...", flush=True)
        m["small_tiers"] = small_tiers(model, args.device, n, print)
        res["models"][model] = m
    res["minutes"] = (time.time() - t0) / 60
    res["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    res["command"] = "python -m cluster.bench.disk" + (" --quick" if args.quick else "")
    Path(args.out).write_text(json.dumps(res, indent=1))
    lines = report(res)
    if args.report:
        write_section(Path(args.report), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
