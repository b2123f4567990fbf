"""`prefixcache demo`: a local service and a shared-system-prompt workload, summarized in a table."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from cluster.client import Cluster
from cluster.workload import chats, shared_prompts
from worker.request import Result


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def summarize_results(results: list[Result]) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    cold = [r.ttft_s for r in ok if r.cached_tokens == 0]
    warm = [r.ttft_s for r in ok if r.cached_tokens > 0]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "hit_rate": cached / prompt if prompt else 0.0,
        "saved": cached,
        "prompt_tokens": prompt,
        "ttft_cold_p50": percentile(cold, 50),
        "ttft_warm_p50": percentile(warm, 50),
    }


def run_demo(
    *,
    workers: int = 2,
    systems: int = 4,
    questions: int = 24,
    chat_count: int = 3,
    chat_turns: int = 3,
    dashboard: bool = True,
    port: int = 8000,
    wait: bool = True,
    out=sys.stdout,
) -> dict[str, float]:
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    say(f"Starting a local service: {workers} workers, demo model, embedded Redis ...")
    t0 = time.perf_counter()
    cluster = Cluster.start(workers=workers, model="demo", device_cache_gb=0.25, host_cache_gb=0.5)
    server = None
    try:
        say(f"  ready in {time.perf_counter() - t0:.1f}s")
        wl = shared_prompts(systems + questions, systems, min_chars=600, max_chars=1200, question_chars=30, seed=1)
        first = {}
        for req, p in zip(wl.requests, wl.prefix_of):
            first.setdefault(p, req)
        firsts = list(first.values())
        rest = [r for r in wl.requests if r not in firsts]
        results: list[Result] = []
        say(f"Phase 1: first question for each of {len(firsts)} system prompts (cold) ...")
        results += cluster.run(firsts)
        say(f"Phase 2: {len(rest)} more users on the same system prompts (warm) ...")
        results += cluster.run(rest)
        say(f"Phase 3: {chat_count} chats x {chat_turns} turns, each turn extends the last ...")
        for _, turn in chats(cluster.run, chat_count, chat_turns, turn_chars=50, seed=1):
            results += turn
        s = summarize_results(results)
        stats = cluster.stats()
        say("")
        say(
            table(
                [
                    [
                        s["requests"],
                        f"{s['hit_rate']:.1%}",
                        f"{s['saved']:,}",
                        f"{s['ttft_cold_p50']:.3f}s",
                        f"{s['ttft_warm_p50']:.3f}s",
                        s["errors"],
                    ]
                ],
                ["requests", "hit rate (tokens)", "prefill tokens saved", "TTFT p50 cold*", "TTFT p50 warm*", "errors"],
            )
        )
        say("* time to first token inside the worker, queueing excluded")
        say("")
        rows = []
        for w, c in stats["per_worker"].items():
            tiers = stats["workers"].get(w, {})
            dev = tiers.get("device_tier", {})
            rows.append(
                [
                    w,
                    c["requests"],
                    f"{c['hit_rate']:.1%}",
                    f"{c['cached_tokens']:,}",
                    f"{dev.get('blocks', 0)}/{dev.get('capacity', 0)}",
                    c["evictions"],
                ]
            )
        say(table(rows, ["worker", "requests", "hit rate", "tokens saved", "device blocks", "evictions"]))
        if s["ttft_warm_p50"] == s["ttft_warm_p50"] and s["ttft_warm_p50"] > 0:
            say(
                f"\nWarm requests reached their first token {s['ttft_cold_p50'] / s['ttft_warm_p50']:.1f}x sooner "
                "than cold ones."
            )
        if dashboard and wait:  # a dashboard only for as long as someone can look at it
            server = _start_dashboard(cluster.redis_url, cluster.service, port, say)
        if server is not None:
            say("\nThe service and dashboard keep running; press Ctrl-C to stop both.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                say("stopping ...")
        return s
    finally:
        if server is not None:
            server.stop()
        cluster.shutdown()


def _start_dashboard(redis_url: str, service: str, port: int, say):
    try:
        from cluster.dashboard.server import DashboardServer
    except ImportError:
        return None
    server = DashboardServer(redis_url, service=service, host="127.0.0.1", port=port).start()
    say(f"\nDashboard: {server.url}   (JSON: {server.url}api/stats, Prometheus: {server.url}metrics)")
    return server
