"""`prefixcache demo`: a local service on a real instruct model, chats sent through its OpenAI-compatible
HTTP API with the official `openai` client, and what the cache did, in a table.

Users share a few system prompts (the part a prefix cache saves); each asks its own question, and two
chats go on for several turns. Answers, cached tokens and times to first token are what the API
reported to the client (`usage.prompt_tokens_details.cached_tokens`, streamed chunks).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cache_store import DISK_CACHE_GB
from cluster.cli.demo_chats import CHATS, QUESTIONS, SYSTEM_PROMPTS
from cluster.cli.lifecycle import stop_on_sigterm
from cluster.release import DASHBOARD_PORT, HTTP_PORT
from cluster.service.client import Cluster

MAX_TOKENS = 48
SHOW_CHARS = 110  # answers are printed on one line, cut here
PARALLEL = 2  # requests in flight in the warm phase: one per worker, so TTFT shows the cache, not a queue


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


@dataclass(frozen=True)
class Answer:
    topic: str
    question: str
    text: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float  # measured by the client: request sent -> first streamed text
    error: str | None = None


def ask(client, model: str, topic: str, messages: list[dict[str, str]]) -> Answer:
    """One chat through the HTTP API, streamed, greedy; usage comes in the last chunk."""
    import openai

    t0 = time.perf_counter()
    ttft, pieces, usage = None, [], None
    try:
        for chunk in client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
    except openai.APIError as e:
        return Answer(topic, messages[-1]["content"], "", 0, 0, 0.0, error=str(e))
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    text = "".join(pieces).strip()
    return Answer(topic, messages[-1]["content"], text, usage.prompt_tokens, cached, ttft or 0.0)


def chat_messages(topic: str, question: str, history: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[topic]}]
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


def summarize(answers: list[Answer]) -> dict[str, float]:
    ok = [a for a in answers if a.error is None]
    prompt = sum(a.prompt_tokens for a in ok)
    cached = sum(a.cached_tokens for a in ok)
    return {
        "requests": len(answers),
        "errors": len(answers) - len(ok),
        "hit_rate": cached / prompt if prompt else 0.0,
        "saved": cached,
        "prompt_tokens": prompt,
        "ttft_cold_p50": percentile([a.ttft_s for a in ok if a.cached_tokens == 0], 50),
        "ttft_warm_p50": percentile([a.ttft_s for a in ok if a.cached_tokens > 0], 50),
    }


def show(say, a: Answer) -> None:
    if a.error:
        say(f"  [{a.topic}] {a.question}\n      ERROR {a.error}")
        return
    text = " ".join(a.text.split())
    say(f"  [{a.topic}] {a.question}")
    say(f"      -> {text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + '...'}")
    say(f"         ({a.prompt_tokens} prompt tokens, {a.cached_tokens} cached; first token after {a.ttft_s:.2f}s)")


def workload(client, model: str, say) -> list[Answer]:
    """Cold first questions, then the other users on the same system prompts, then multi-turn chats."""
    answers: list[Answer] = []
    say(f"\nPhase 1: the first question on each of {len(SYSTEM_PROMPTS)} system prompts (cache empty)")
    for topic, questions in QUESTIONS.items():
        answers.append(ask(client, model, topic, chat_messages(topic, questions[0])))
        show(say, answers[-1])
    rest = [(t, q) for t, qs in QUESTIONS.items() for q in qs[1:]]
    say(f"\nPhase 2: {len(rest)} more users on the same system prompts, {PARALLEL} at a time")
    with ThreadPoolExecutor(PARALLEL) as pool:
        warm = list(pool.map(lambda tq: ask(client, model, tq[0], chat_messages(*tq)), rest))
    answers += warm
    for a in warm[:: max(1, len(warm) // 3)][:3]:
        show(say, a)
    say(f"\nPhase 3: {len(CHATS)} chats of {len(CHATS[0][1])} turns; each turn resends the whole conversation")
    for topic, turns in CHATS:
        history: list[tuple[str, str]] = []
        for q in turns:
            a = ask(client, model, topic, chat_messages(topic, q, history))
            answers.append(a)
            history.append((q, a.text))
            show(say, a)
    return answers


def print_tables(say, s: dict[str, float], stats: dict) -> None:
    say("")
    row = [
        s["requests"],
        f"{s['hit_rate']:.1%}",
        f"{s['saved']:,}",
        f"{s['ttft_cold_p50']:.3f}s",
        f"{s['ttft_warm_p50']:.3f}s",
        s["errors"],
    ]
    header = ["requests", "hit rate (tokens)", "cached_tokens (API)", "TTFT p50 cold*", "TTFT p50 warm*", "errors"]
    say(table([row], header))
    say("* time to first token seen by the openai client over HTTP (streaming), queueing included")
    say("")
    rows = []
    for w, c in stats["per_worker"].items():
        info = stats["workers"].get(w, {})
        dev, disk = info.get("device_tier", {}), info.get("disk", {})
        on_disk = f"{disk['bytes_used'] / 1e6:,.0f} MB, {disk['hits']:,} hits" if disk.get("bytes_capacity") else "off"
        rows.append(
            [
                w,
                c["requests"],
                f"{c['hit_rate']:.1%}",
                f"{c['cached_tokens']:,}",
                f"{dev.get('blocks', 0)}/{dev.get('capacity', 0)}",
                on_disk,
                c["evictions"],
            ]
        )
    say(table(rows, ["worker", "requests", "hit rate", "tokens saved", "device blocks", "disk tier", "evictions"]))
    if s["ttft_warm_p50"] == s["ttft_warm_p50"] and s["ttft_warm_p50"] > 0:
        ratio = s["ttft_cold_p50"] / s["ttft_warm_p50"]
        say(f"\nRequests that hit the cache saw their first token {ratio:.1f}x sooner than cold ones.")


def run_demo(
    *,
    model: str = "smollm2",
    workers: int = 2,
    http_port: int = HTTP_PORT,
    dashboard: bool = True,
    port: int = DASHBOARD_PORT,
    wait: bool = True,
    out=sys.stdout,
    disk_cache_dir: str | None = None,
    disk_cache_gb: float = DISK_CACHE_GB,
) -> dict[str, float]:
    import openai

    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    say(f"Starting a local service: {workers} workers, model {model!r}, embedded Redis, HTTP API ...")
    if disk_cache_dir is not None:
        say(f"  disk tier: {disk_cache_gb:g} GB per worker under {disk_cache_dir} (a second run starts warm from it)")
    t0 = time.perf_counter()
    with stop_on_sigterm():
        cluster = Cluster.start(
            workers=workers,
            model=model,
            device_cache_gb=0.25,
            host_cache_gb=0.5,
            disk_cache_dir=disk_cache_dir,
            disk_cache_gb=disk_cache_gb,
            http_port=http_port,
        )
    server = None
    with stop_on_sigterm():  # again: ray.init installed its own handler
        try:
            say(f"  ready in {time.perf_counter() - t0:.1f}s; OpenAI-compatible API at {cluster.http_url}/v1")
            client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="not-needed", max_retries=0)
            answers = workload(client, model, say)
            s = summarize(answers)
            print_tables(say, s, cluster.stats())
            if wait:
                server = _start_dashboard(cluster.redis_url, cluster.service, port, say) if dashboard else None
                _serve_until_stopped(say, cluster.http_url, model)
            return s
        finally:
            if server is not None:
                server.stop()
            cluster.shutdown()
            say("stopped: service, HTTP API and dashboard")


def _serve_until_stopped(say, url: str, model: str) -> None:
    say("\nThe service keeps running. Try it:")
    say(
        f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of Spain?"}}]}}\''
    )
    say("Ctrl-C (or SIGTERM) stops everything.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping ...")


def _start_dashboard(redis_url: str, service: str, port: int, say):
    from cluster.dashboard.server import DashboardServer

    server = DashboardServer(redis_url, service=service, host="127.0.0.1", port=port).start()
    say(f"\nDashboard: {server.url}   (JSON: {server.url}api/stats, Prometheus: {server.url}metrics)")
    return server
