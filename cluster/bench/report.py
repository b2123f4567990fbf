"""BENCHMARKS.md and its plots from the suite's results."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODE_NAMES = {
    "a": "a. plain transformers",
    "b": "b. transformers prompt-cache recipe",
    "c": "c. per-worker caches, round robin",
    "d": "d. prefixcache (cache-aware, shared index, peer fetch)",
    "e": "e. prefixcache, small device tier (host tier serves)",
}
PLOTS = "bench-plots"


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def ms(x):
    return f"{1000 * x:.0f} ms" if x == x else "n/a"


def mib(n):
    return f"{n / 2**20:.0f} MiB"


def summary(rows, wall=None):
    ttft = [r["ttft_s"] for r in rows]
    lat = [r["latency_s"] for r in rows]
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] for r in rows)
    total = wall if wall else sum(lat)
    return {
        "n": len(rows),
        "ttft_p50": pct(ttft, 50),
        "ttft_p95": pct(ttft, 95),
        "lat_p50": pct(lat, 50),
        "lat_p95": pct(lat, 95),
        "req_s": len(rows) / total if total else 0.0,
        "tok_s": sum(r["new_tokens"] for r in rows) / total if total else 0.0,
        "hit": cached / prompt if prompt else 0.0,
        "saved": cached,
        "warm_ttft_p50": pct([r["ttft_s"] for r in rows if r["cached_tokens"]], 50),
    }


def goals(res) -> list[list[str]]:
    sweep = {s["prefix_tokens"]: s for s in res["inproc"]["sweep"]}
    at = sweep.get(1536) or sweep[max(sweep)]
    speedup = at["plain_ttft_s"] / at["cached_ttft_s"]
    vs_limit = at["cached_ttft_s"] / at["limit_s"]
    svc = res["service"]
    one = svc["workers"]["1"]["hit_rate"]
    d = summary(svc["modes"]["d"]["shared"])["hit"]
    c = summary(svc["modes"]["c"]["shared"])["hit"]
    cold = res["inproc"]["cold"]
    overhead = pct([r["ttft_s"] for r in cold["engine"]], 50) / pct([r["ttft_s"] for r in cold["a"]], 50) - 1
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    n = at["prefix_tokens"]
    return [
        [f"warm TTFT vs (a), {n}-token prefix", ">= 10x faster", f"{speedup:.1f}x", yes(speedup >= 10)],
        [f"warm TTFT vs suffix-only limit, {n}-token prefix", "<= 1.15x", f"{vs_limit:.2f}x", yes(vs_limit <= 1.15)],
        [
            "(d) hit rate vs one shared cache of the same size",
            ">= 95%",
            f"{d / one:.1%} ({d:.1%} vs {one:.1%})",
            yes(d >= 0.95 * one),
        ],
        ["(d) hit rate vs (c) round robin", "clearly above", f"{d:.1%} vs {c:.1%}", yes(d > c + 0.02)],
        ["cold overhead vs (a) (TTFT p50, no sharing)", "<= 5%", f"{overhead:+.1%}", yes(overhead <= 0.05)],
    ]


def table(rows, header) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def mode_rows(res, workload: str) -> list[list[str]]:
    inproc, svc = res["inproc"], res["service"]
    rows = []
    sources = []
    if workload == "shared":
        sources += [
            ("a", inproc["shared"]["a"], None, {}),
            ("b", inproc["shared"]["b"], None, {"device": inproc["shared"]["b_memory_bytes"]}),
        ]
    elif workload == "cold":
        sources += [("a", inproc["cold"]["a"], None, {})]
    for key in ("c", "d", "e"):
        m = svc["modes"][key]
        sources.append((key, m[workload], m.get(f"{workload}_wall_s"), m["memory"]))
    for key, data, wall, mem in sources:
        s = summary(data, wall)
        rows.append(
            [
                MODE_NAMES[key],
                ms(s["ttft_p50"]),
                ms(s["ttft_p95"]),
                ms(s["lat_p50"]),
                ms(s["lat_p95"]),
                f"{s['req_s']:.2f}",
                f"{s['tok_s']:.1f}",
                f"{s['hit']:.1%}",
                f"{s['saved']:,}",
                mib(mem.get("device", 0)),
                mib(mem.get("host", 0)),
            ]
        )
    return rows


HEADER = [
    "mode",
    "TTFT p50",
    "TTFT p95",
    "latency p50",
    "latency p95",
    "req/s",
    "tok/s",
    "hit rate",
    "prefill tokens saved",
    "device mem",
    "host mem",
]


def plots(res, out: Path) -> None:
    d = out / PLOTS
    d.mkdir(exist_ok=True)
    ttft_cdf_plot(res, d / "ttft_cdf.png")
    speedup_plot(res["inproc"]["sweep"], d / "speedup_vs_prefix.png")
    workers_plot(res["service"]["workers"], d / "hit_rate_vs_workers.png")


def ttft_cdf_plot(res, path: Path) -> None:
    inproc, svc = res["inproc"], res["service"]
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {
        "a": inproc["shared"]["a"],
        "b": inproc["shared"]["b"],
        **{k: svc["modes"][k]["shared"] for k in ("c", "d", "e")},
    }
    for k, rows in series.items():
        xs = sorted(1000 * r["ttft_s"] for r in rows)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=MODE_NAMES[k])
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF, shared system prompts")
    ax.legend(fontsize=7)
    _save(fig, path)


def speedup_plot(sweep: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    sw = [s for s in sweep if s["prefix_tokens"]]
    xs = [s["prefix_tokens"] for s in sw]
    ax.plot(xs, [s["plain_ttft_s"] / s["cached_ttft_s"] for s in sw], "o-", label="prefixcache (warm) vs plain")
    ax.plot(xs, [s["plain_ttft_s"] / s["limit_s"] for s in sw], "s--", label="suffix-only limit vs plain")
    ax.set_xlabel("cached prefix (tokens), 64-token suffix")
    ax.set_ylabel("TTFT speedup (x)")
    ax.set_title("Speedup vs prefix length")
    ax.legend()
    _save(fig, path)


def workers_plot(workers: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ws = sorted(workers, key=int)
    xs = [int(w) for w in ws]
    ax.plot(xs, [100 * workers[w]["hit_rate"] for w in ws], "o-", label="hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("workers (same total cache)")
    ax.set_ylabel("token hit rate (%)")
    ax2 = ax.twinx()
    ax2.plot(xs, [workers[w]["req_per_s"] for w in ws], "s--", color="tab:green", label="requests/s")
    ax2.set_ylabel("requests/s")
    ax.set_xticks(xs)
    ax.set_title("Hit rate and throughput vs workers")
    fig.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict, out: Path) -> None:
    """BENCHMARKS.md from one suite run: its sections in reading order, then the kept ones."""
    plots(res, out)
    lines = (
        intro(res)
        + goals_section(res)
        + shared_section(res)
        + chats_section(res)
        + cold_section(res)
        + sweep_section(res)
        + workers_section(res)
    )
    if "batching" in res:
        from cluster.bench.batching import report_lines

        lines += report_lines(res["batching"])
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + kept_sections(out / "BENCHMARKS.md"))


def provenance(res, cmd: str) -> str:
    """Which runs made the numbers: one `prefixcache bench`, or its service part and a later
    `--only batching` (results from before parts were recorded read as one run)."""
    svc, batch = res.get("run"), res.get("batching", {}).get("run")
    raw = "raw data in `bench-results.json`"
    if svc is None or batch is None or svc["command"] == batch["command"]:
        minutes = svc["minutes"] + (batch["minutes"] if batch else 0) if svc else res["elapsed_s"] / 60
        return f"Made by `{cmd}` on {res['machine']['date']} in {minutes:.1f} minutes; every number below comes from that one run ({raw})."
    return (
        f"Made by `{svc['command']}` on {svc['date']} (service part, {svc['minutes']:.0f} minutes), then "
        f"`{batch['command']}` on {batch['date']} ({batch['minutes']:.0f} minutes), on the same machine; {raw}."
    )


def intro(res) -> list[str]:
    """Where the numbers come from and how to read them."""
    m, svc = res["machine"], res["service"]
    cmd = "prefixcache bench --quick" if res["quick"] else "prefixcache bench"
    return [
        "# Benchmarks",
        "",
        provenance(res, cmd),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, GPU: {m['gpu']}; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, Ray {m['ray']}. Model: the built-in demo model "
        "(Llama architecture, 22.8M parameters, float32, byte tokenizer, 16-token blocks).",
        "",
        "How to read it: in-process modes (a, b, the sweep, the cold-overhead check) run one request at a time "
        "with one torch thread, the compute one service worker gets; service modes (c, d, e) run 2 workers of one "
        "CPU each with two requests in flight per worker. TTFT is measured where the prefill runs (the worker for "
        "c-e, from the request's arrival there, waiting for a batch slot included); latency is at the client, "
        "queueing and Ray included. Every service mode gets the "
        f"same total KV cache ({1024 * svc['total_cache_gb']:.0f} MiB, 1.5x the {svc['working_set_blocks']} blocks of "
        "system prompts). (c) is the same service with `round_robin` placement: each worker caches only what it "
        "saw, what per-replica prefix caching gives behind a plain load balancer.",
        "",
    ]


def goals_section(res) -> list[str]:
    return ["## Goals", "", table(goals(res), ["goal", "target", "measured", "met"]), ""]


def shared_section(res) -> list[str]:
    size = res["sizes"]
    warm = summary(res["service"]["modes"]["d"]["shared"])["warm_ttft_p50"]
    limit = pct(res["inproc"]["shared"]["limit_s"], 50)
    return [
        f"## Shared system prompts ({size['systems']} prompts of {size['min_chars']}-{size['max_chars']} tokens, "
        f"Zipf popularity, {size['questions']} requests, {size['new_tokens']} new tokens each)",
        "",
        table(mode_rows(res, "shared"), HEADER),
        "",
        f"Warm requests of (d): TTFT p50 {ms(warm)} against a suffix-only limit p50 of "
        f"{ms(limit)} for the same prompts (the prefix's KV already in a cache, only the question computed).",
        "",
        "![TTFT CDF](" + PLOTS + "/ttft_cdf.png)",
        "",
    ]


def chats_section(res) -> list[str]:
    size = res["sizes"]
    return [
        f"## Multi-turn chats ({size['chats']} chats x {size['turns']} turns, each prompt = previous prompt + answer "
        "+ new question)",
        "",
        table(mode_rows(res, "chats"), HEADER),
        "",
        "The prompt-cache recipe (b) has no answer for growing conversations, and (a) recomputes everything; "
        "prefixcache stores generated tokens' blocks too, so each turn hits the previous one.",
        "",
    ]


def cold_section(res) -> list[str]:
    size = res["sizes"]
    return [
        f"## No sharing ({size['cold_n']} distinct prompts of {size['cold_chars']} tokens)",
        "",
        table(mode_rows(res, "cold"), HEADER),
        "",
    ]


SWEEP_HEADER = [
    "prefix tokens",
    "plain TTFT",
    "cached TTFT",
    "suffix-only limit",
    "speedup",
    "cached / limit",
    "cached tokens",
]


def sweep_section(res) -> list[str]:
    rows = [
        [
            s["prefix_tokens"],
            ms(s["plain_ttft_s"]),
            ms(s["cached_ttft_s"]),
            ms(s["limit_s"]),
            f"{s['plain_ttft_s'] / s['cached_ttft_s']:.1f}x",
            f"{s['cached_ttft_s'] / s['limit_s']:.2f}x",
            s["cached_tokens"],
        ]
        for s in res["inproc"]["sweep"]
    ]
    return [
        "## Prefix length sweep (in-process Engine, 64-token suffix, first token)",
        "",
        table(rows, SWEEP_HEADER),
        "",
        "![speedup](" + PLOTS + "/speedup_vs_prefix.png)",
        "",
    ]


def workers_section(res) -> list[str]:
    workers = res["service"]["workers"]
    rows = [
        [w, f"{v['hit_rate']:.1%}", f"{v['req_per_s']:.2f}", f"{v['tok_per_s']:.1f}"]
        for w, v in sorted(workers.items(), key=lambda kv: int(kv[0]))
    ]
    return [
        "## Workers (same total cache, shared system prompts)",
        "",
        table(rows, ["workers", "hit rate", "req/s", "tok/s"]),
        "",
        "![workers](" + PLOTS + "/hit_rate_vs_workers.png)",
        "",
    ]


KEEP = "<!-- Sections below this line come from other benchmark commands; `prefixcache bench` keeps them. -->"


def kept_sections(path: Path) -> str:
    """What follows the KEEP marker in the existing report (cluster-scale results made by the simulator,
    index and router benchmarks), so a suite run does not erase them."""
    text = path.read_text() if path.exists() else ""
    return "\n" + KEEP + text.split(KEEP, 1)[1] if KEEP in text else ""


def put_section(path: Path, heading: str, lines: list[str]) -> None:
    """Write one section of another benchmark command below the KEEP marker: it replaces the
    section with the same heading (up to the next heading of its level or higher), or is appended."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if KEEP not in text:
        text = text.rstrip("\n") + "\n\n" + KEEP + "\n"
    head, kept = text.split(KEEP, 1)
    level = heading.split(" ", 1)[0]
    out: list[str] = []
    skipping = placed = False
    for line in kept.split("\n"):
        if line == heading:
            skipping = placed = True
            out += [*lines]
            continue
        if skipping and line.startswith("#") and len(line.split(" ", 1)[0]) <= len(level):
            skipping = False
        if not skipping:
            out.append(line)
    body = "\n".join(out)
    if not placed:
        body = body.rstrip("\n") + "\n\n" + "\n".join(lines)
    path.write_text(head + KEEP + body.rstrip("\n") + "\n")
