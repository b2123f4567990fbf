"""NVIDIA's `aiperf` load generator against the service's OpenAI-compatible chat endpoint, beside the
same requests through one in-process Engine, so users can set our numbers beside what the same tool
measured on other servers (vLLM, SGLang, TRT-LLM) and see what HTTP, Ray and the router add.

    python -m cluster.bench.loadgen                       # start smollm2 x 2 workers here, run, stop
    python -m cluster.bench.loadgen --url http://HOST:8000 --model smollm2   # a running service

Streaming chat with a shared system prompt (what the prefix cache serves) and a per-request user
prompt, at each concurrency in turn (default 1, 8, 32), with `ignore_eos` and `min_tokens` so every
answer is exactly --osl tokens long. The prefix cache is emptied before each level (aiperf's
--reset-kv-cache posts to our /reset_prefix_cache), so every level starts cold and warms up alike.

Then the in-process reference: the very prompts aiperf sent (its inputs.json, rendered through the
same chat template), greedy, exactly --osl tokens, closed loop, through one `Engine` with one
worker's compute (--cpus-per-worker torch threads) at concurrency c / workers: what each worker
serves when the router splits a level evenly. Its times are the engine's own (`Result`), from the
request reaching the engine; aiperf's are at the client. The section "Load generator" of
BENCHMARKS.md is rewritten with both (below the marker `prefixcache bench` keeps), and the raw rows
go to bench-results-loadgen.json.

aiperf is never a dependency of the project: it is installed on first use into its own venv,
LOADGEN_DIR/aiperf (git-ignored), pinned to AIPERF_VERSION.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import venv
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

AIPERF_VERSION = "0.13.0"
ROOT = Path(__file__).resolve().parents[2]
LOADGEN_DIR = ROOT / ".loadgen"
SECTION = "## Load generator: aiperf against the HTTP API"  # its heading in BENCHMARKS.md
COMMAND = "python -m cluster.bench.loadgen"
# aiperf's summary metrics we report (times in ms, as aiperf reports them), and their stats
TIMES = ("time_to_first_token", "inter_token_latency", "request_latency")
RATES = ("output_token_throughput", "request_throughput")
STATS = ("avg", "p50", "p99")


def aiperf(venv_dir: Path = LOADGEN_DIR / "aiperf") -> Path:
    """The aiperf executable, installed into its own venv the first time."""
    exe = venv_dir / "bin" / "aiperf"
    if not exe.exists():
        print(f"installing aiperf=={AIPERF_VERSION} into {venv_dir} (once)", file=sys.stderr)
        venv.create(venv_dir, with_pip=True)
        pip = [str(venv_dir / "bin" / "python"), "-m", "pip", "install", "-q", f"aiperf=={AIPERF_VERSION}"]
        subprocess.run(pip, check=True)
    return exe


def tokenizer_dir(model: str, scratch: Path) -> Path:
    """A local Hugging Face directory whose tokenizer aiperf sizes the prompts with (no hub access)."""
    if model == "demo":
        from worker.demo_model import write_demo_model

        return write_demo_model(scratch / "demo")
    from worker.models import model_path

    return model_path(model)


def requests_at(concurrency: int, a: argparse.Namespace) -> int:
    return max(a.requests, a.requests_per_stream * concurrency)


def profile_args(url: str, model: str, tokenizer: Path, concurrency: int, a: argparse.Namespace, out: Path) -> list:
    return [
        "profile",
        *("--model", model, "--url", url, "--endpoint-type", "chat", "--streaming"),
        *("--tokenizer", str(tokenizer), "--concurrency", str(concurrency)),
        *("--request-count", str(requests_at(concurrency, a)), "--warmup-request-count", str(concurrency)),
        *("--shared-system-prompt-length", str(a.system_tokens), "--isl", str(a.isl), "--osl", str(a.osl)),
        *("--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{a.osl}"),
        *("--use-server-token-count", "--per-chunk-usage", "--reset-kv-cache"),
        *("--random-seed", "20", "--ui", "none", "--output-artifact-dir", str(out)),
        *(("--api-key", a.api_key) if a.api_key else ()),
    ]


def summary(out: Path) -> dict[str, float]:
    """STATS of TIMES, the RATES, the request and error counts and the cache's share of prompt
    tokens, from aiperf's JSON export of the whole run (the per-phase copies below it are not read)."""
    data = json.loads((out / "profile_export_aiperf.json").read_text())
    row: dict[str, float] = {}
    for key in TIMES:
        for stat in STATS:
            value = (data.get(key) or {}).get(stat)
            if value is not None:
                row[f"{key}_{stat}"] = float(value)
    for key in RATES:
        row[key] = float((data.get(key) or {}).get("avg", float("nan")))
    row["requests"] = float((data.get("completed_request_count") or data.get("request_count") or {}).get("avg", 0))
    row["errors"] = float(sum(e.get("count", 1) for e in data.get("error_summary") or []))
    row["cache_read_pct"] = float((data.get("overall_usage_prompt_cache_read_pct") or {}).get("avg", float("nan")))
    return row


def sent_prompts(out: Path, model: str) -> dict[str, list[list[int]]]:
    """The prompt token ids aiperf sent in each phase ("warmup", "profiling"), in the order it sent
    them (its per-request records name the conversation of its inputs.json each one ran), as the
    chat endpoint renders them."""
    from cluster.http.chat import chat_ids
    from worker.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    data = json.loads((out / "inputs.json").read_text())["data"]
    prompts = {s["session_id"]: chat_ids(tokenizer, s["payloads"][0]["messages"]) for s in data}
    records = [json.loads(line)["metadata"] for line in (out / "profile_export.jsonl").read_text().splitlines()]
    phases: dict[str, list[list[int]]] = {"warmup": [], "profiling": []}
    for m in sorted(records, key=lambda m: m["credit_issued_ns"]):
        phases.setdefault(m["benchmark_phase"], []).append(prompts[m["conversation_id"]])
    return phases


# ---- the in-process reference (in a fresh process: see batching.run_isolated for why) ----------


def inprocess(model: str, levels: list[tuple[int, dict[str, list[list[int]]]]], osl: int, cpus: int) -> list:
    """One engine's row per (concurrency, prompts of each phase). Runs in a spawned process."""
    import torch

    from cluster.bench.batching import closed_loop
    from worker.engine import Engine
    from worker.request import Request

    def build() -> Engine:
        torch.set_num_threads(cpus)  # on the engine's own thread, as a worker actor does
        return Engine.from_pretrained(model, device="cpu")

    engine = Engine.on_own_thread(build, name="engine-loadgen")
    rows = []
    try:
        for c, phases in levels:

            def serve(ids: list[int]):
                r = engine.run(Request(ids, max_new_tokens=osl, ignore_eos=True, min_tokens=osl))
                assert r.ok and len(r.token_ids) == osl, r.error
                return r

            engine.reset_prefix_cache()
            closed_loop(serve, phases["warmup"], c)  # aiperf's warm-up, untimed
            results, wall = closed_loop(serve, phases["profiling"], c)
            rows.append(engine_row(results, wall, osl))
    finally:
        engine.close()
    return rows


def engine_row(results, wall: float, osl: int) -> dict[str, float]:
    """aiperf's metrics from the engine's own times: TTFT = queueing + first token, ITL = the rest
    over the other osl - 1 tokens, latency from arrival to the last token."""
    ttft = [1000 * (r.queue_s + r.ttft_s) for r in results]
    itl = [1000 * (r.latency_s - r.queue_s - r.ttft_s) / max(1, osl - 1) for r in results]
    lat = [1000 * r.latency_s for r in results]
    row: dict[str, float] = {}
    for key, xs in zip(TIMES, (ttft, itl, lat)):
        row[f"{key}_avg"] = sum(xs) / len(xs)
        row[f"{key}_p50"] = _pct(xs, 50)
        row[f"{key}_p99"] = _pct(xs, 99)
    row["output_token_throughput"] = sum(len(r.token_ids) for r in results) / wall
    row["request_throughput"] = len(results) / wall
    row["requests"] = float(len(results))
    row["errors"] = 0.0
    prompt = sum(r.prompt_tokens for r in results)
    row["cache_read_pct"] = 100 * sum(r.cached_tokens for r in results) / prompt if prompt else 0.0
    return row


def _pct(xs: list[float], p: int) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# ---- the report ---------------------------------------------------------------------------------


COLUMNS = (  # (aiperf metric, stat) per time column
    ("time_to_first_token", "p50"),
    ("time_to_first_token", "p99"),
    ("inter_token_latency", "p50"),
    ("inter_token_latency", "p99"),
    ("request_latency", "p50"),
)


def table(rows: dict[str, dict[int, dict[str, float]]], workers: int) -> list[str]:
    head = "| c | run | requests | errors | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | latency p50 | out tok/s | req/s | cached |"
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(rows["aiperf"]):
        labels = {
            "aiperf": f"aiperf, HTTP, {workers} workers",
            "inprocess": f"in-process Engine at {max(1, c // workers)}",
        }
        for run, label in labels.items():
            r = rows.get(run, {}).get(c)
            if r is None:
                continue
            cells = [str(c), label, f"{r['requests']:.0f}", f"{r['errors']:.0f}"]
            cells += [_ms(r.get(f"{key}_{stat}")) for key, stat in COLUMNS]
            cells += [f"{r['output_token_throughput']:.1f}", f"{r['request_throughput']:.2f}"]
            cells.append(f"{r['cache_read_pct']:.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ms(x: float | None) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def section(rows: dict, a: argparse.Namespace, took_s: float, load: float) -> list[str]:
    return [
        SECTION,
        "",
        f"Made by `{COMMAND}` on {date.today().isoformat()} ({took_s / 60:.0f} minutes"
        f"{', the aiperf rows read from an earlier run with --reuse' if a.reuse else ''}; "
        f"{os.cpu_count()} cores, {platform.machine()}, load average {load:.1f} when it started; "
        f"raw rows in `bench-results-loadgen.json`). "
        f"aiperf {AIPERF_VERSION}, streaming chat against `--model {a.model} --workers {a.workers}`: "
        f"a shared system prompt of {a.system_tokens} tokens and {a.isl} tokens of its own per request, "
        f"exactly {a.osl} new tokens (`ignore_eos`, `min_tokens`), the cache emptied before each "
        f"concurrency c (POST /reset_prefix_cache), c warm-up requests, then "
        f"max({a.requests}, {a.requests_per_stream} x c) timed ones. aiperf's times are at the client. "
        f"The in-process rows send the prompts aiperf sent through one `Engine` with one worker's "
        f"compute at concurrency c / {a.workers} (each worker's share when the router splits evenly), "
        f"timed by the engine from the request reaching it; `cached` is the prompt tokens the cache "
        f"served (usage.prompt_tokens_details.cached_tokens for aiperf).",
        "",
        *table(rows, a.workers),
        "",
    ]


def write_report(path: Path, lines: list[str]) -> None:
    from cluster.bench.report import put_section

    put_section(path, SECTION, lines)


# ---- the command ---------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict[str, dict[int, dict[str, float]]]:
    out_root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="prefixcache-aiperf-")) / "artifacts"
    if a.reuse:
        rows = {"aiperf": {c: summary(out_root / f"concurrency-{c}") for c in a.concurrency}, "inprocess": {}}
    else:
        rows = profile(a, out_root)
    if a.inprocess:
        levels = [(max(1, c // a.workers), sent_prompts(out_root / f"concurrency-{c}", a.model)) for c in a.concurrency]
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            got = pool.submit(inprocess, a.model, levels, a.osl, a.cpus_per_worker).result()
        rows["inprocess"] = dict(zip(a.concurrency, got))
    return rows


def profile(a: argparse.Namespace, out_root: Path) -> dict[str, dict[int, dict[str, float]]]:
    """aiperf at each concurrency against the service at --url, or one started here for the run."""
    exe = aiperf()
    scratch = Path(tempfile.mkdtemp(prefix="prefixcache-aiperf-"))
    cluster = None
    url = a.url
    if url is None:
        from cache_store.embedded import free_port
        from cluster import Cluster

        cluster = Cluster.start(workers=a.workers, model=a.model, service="aiperf", http_port=free_port())
        url = cluster.http_url
    rows: dict[str, dict[int, dict[str, float]]] = {"aiperf": {}, "inprocess": {}}
    try:
        tok = tokenizer_dir(a.model, scratch)
        for c in a.concurrency:
            out = out_root / f"concurrency-{c}"
            subprocess.run([str(exe), *profile_args(url, a.model, tok, c, a, out)], check=True)
            rows["aiperf"][c] = summary(out)
            print(f"aiperf, concurrency {c}: {json.dumps(rows['aiperf'][c])}", file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.shutdown()
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running service's API (default: start one here)")
    p.add_argument("--model", default="smollm2", help="the served model's name (and tokenizer)")
    p.add_argument("--workers", type=int, default=2, help="workers of the service started here")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="torch threads of the in-process engine")
    p.add_argument("--api-key", default=None, help="a key from the service's --api-keys file")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="timed requests per level, at least")
    p.add_argument("--requests-per-stream", type=int, default=4, help="and at least this many per concurrent stream")
    p.add_argument("--system-tokens", type=int, default=512, help="the shared system prompt's length")
    p.add_argument("--isl", type=int, default=64, help="each request's own prompt tokens")
    p.add_argument("--osl", type=int, default=64, help="tokens generated per request (exactly: ignore_eos)")
    p.add_argument("--no-inprocess", dest="inprocess", action="store_false", help="skip the in-process rows")
    p.add_argument("--out", default=None, help="aiperf's artifacts (default: a temporary directory)")
    p.add_argument("--reuse", action="store_true", help="read aiperf's artifacts in --out instead of running it")
    p.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"), help="rewrite its section here ('' = no)")
    p.add_argument("--json-out", default=str(ROOT / "bench-results-loadgen.json"), help="the rows ('' = no)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    started, load = time.perf_counter(), os.getloadavg()[0]  # load: what else ran on the machine
    rows = run(a)
    lines = section(rows, a, time.perf_counter() - started, load)
    print("\n".join(lines))
    if a.report:
        write_report(Path(a.report), lines)
    if a.json_out:
        record = {"aiperf": AIPERF_VERSION, "args": vars(a), "rows": rows}
        Path(a.json_out).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r.get("errors", 0) == 0 for r in rows["aiperf"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
