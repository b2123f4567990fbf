"""One worker's engine under closed-loop concurrency: batching against one-at-a-time and transformers.

Modes, side by side on the same prompts (token ids, greedy, every request generating exactly
`new_tokens` tokens):
  (i)   this engine (continuous batching over the paged cache);
  (ii)  this engine with max_running=1 (one request at a time, same cache);
  (iii) transformers' own continuous batching (`init_continuous_batching`, the engine behind
        `generate_batch`, block sharing on), fed as requests arrive;
  (iv)  plain `generate()` one request at a time.
Workloads: shared system prompts with short suffixes (warm after the first request of each
prompt), and no sharing. Closed loop: `c` clients each send their next request when the last one
finished. TTFT and time per output token come from each engine's own per-token times, queueing included.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from worker.request import Request

SECTION = "## Batching: one worker under closed-loop concurrency"  # its heading in BENCHMARKS.md

MODES = {
    "i": "prefixcache, batched",
    "ii": "prefixcache, max_running=1",
    "iii": "transformers continuous batching",
    "iv": "plain generate(), one at a time",
}


@dataclass(frozen=True)
class BatchSizes:
    systems: int = 4
    system_tokens: int = 1024
    suffix_tokens: int = 32
    cold_tokens: int = 512
    new_tokens: int = 32
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    # Requests per concurrency level: waves_per_client x c, at least min_requests and at most max_requests
    # (four waves at c=16: one or two waves last a few seconds, too short to read a rate from).
    min_requests: int = 8
    max_requests: int = 96
    waves_per_client: int = 4


QUICK_BATCH = BatchSizes(2, 256, 16, 128, 8, (1, 4), 4, waves_per_client=2)


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    latency_s: float
    new_tokens: int
    prompt_tokens: int
    cached_tokens: int


Serve = Callable[[list[int]], Sample]


def prompts(size: BatchSizes, workload: str, n: int, seed: int) -> list[list[int]]:
    """Token ids for the demo's byte tokenizer (0-255): shared = one of K system prompts + a unique
    suffix; cold = unique throughout."""
    import random

    rng = random.Random(seed)
    systems = [[random.Random(k).randrange(32, 127) for _ in range(size.system_tokens)] for k in range(size.systems)]
    out = []
    for i in range(n):
        if workload == "shared":
            out.append(systems[i % size.systems] + [rng.randrange(32, 127) for _ in range(size.suffix_tokens)])
        else:
            out.append([rng.randrange(32, 127) for _ in range(size.cold_tokens)])
    return out


def closed_loop(serve: Serve, work: list[list[int]], concurrency: int) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    lock = threading.Lock()
    todo = iter(work)

    def client() -> None:
        while True:
            with lock:
                ids = next(todo, None)
            if ids is None:
                return
            s = serve(ids)
            with lock:
                samples.append(s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples, time.perf_counter() - t0


def engine_server(engine, new_tokens: int) -> Serve:
    """TTFT and latency as the engine measures them (`Result.ttft_s`, `latency_s`: from the request
    reaching the engine, queueing included), so client threads of this process that wait for the
    GIL do not blur them."""

    def serve(ids: list[int]) -> Sample:
        r = engine.run(Request(ids, max_new_tokens=new_tokens))
        assert r.ok, r.error
        return Sample(r.ttft_s, r.latency_s, len(r.token_ids), r.prompt_tokens, r.cached_tokens)

    return serve


def plain_server(model, new_tokens: int, torch_thread: ThreadPoolExecutor) -> Serve:
    """generate() one request at a time, on `torch_thread` (one thread, like every engine here)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def generate(ids: list[int], t0: float) -> Sample:
        with torch.inference_mode():
            st = FirstToken()
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=st,
                pad_token_id=0,
            )
        end = time.perf_counter()
        return Sample((st.first or end) - t0, end - t0, out.shape[1] - len(ids), len(ids), 0)

    def serve(ids: list[int]) -> Sample:
        return torch_thread.submit(generate, ids, time.perf_counter()).result()

    return serve


class TransformersCB:
    """transformers' continuous batching manager, with a result callback per request (its
    documented path for concurrent serving)."""

    def __init__(self, model, new_tokens: int, max_batch_tokens: int):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
        cb = ContinuousBatchingConfig(allow_block_sharing=True, max_batch_tokens=max_batch_tokens)
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self.manager.start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.n = 0
        self.lock = threading.Lock()

    def serve(self, ids: list[int]) -> Sample:
        with self.lock:
            self.n += 1
            rid = f"r{self.n}"
        done = threading.Event()
        state = {"out": None}

        def on_result(out):
            if out.is_finished():
                state["out"] = out
                done.set()

        async def register():
            self.manager.register_result_handler(rid, on_result)

        asyncio.run_coroutine_threadsafe(register(), self.loop).result()
        t0 = time.perf_counter()
        self.manager.add_request(ids, request_id=rid, streaming=True, record_timestamps=True)
        if not done.wait(timeout=600):
            raise RuntimeError("transformers continuous batching did not finish a request in 600 s")
        out = state["out"]
        stamps = out.timestamps or [time.perf_counter()]  # its own per-token times, like (i)'s
        return Sample(stamps[0] - t0, stamps[-1] - t0, len(out.generated_tokens), len(ids), 0)

    def close(self) -> None:
        self.manager.stop(block=True)
        self.loop.call_soon_threadsafe(self.loop.stop)


def summarize(samples: list[Sample], wall: float) -> dict:
    ttft = sorted(s.ttft_s for s in samples)
    warm = sorted(s.ttft_s for s in samples if s.cached_tokens > 0)
    tpot = sorted((s.latency_s - s.ttft_s) / max(1, s.new_tokens - 1) for s in samples)
    prompt = sum(s.prompt_tokens for s in samples)
    return {
        "requests": len(samples),
        "out_tok_per_s": sum(s.new_tokens for s in samples) / wall,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p95_s": _pct(ttft, 95),
        "warm_ttft_p50_s": _pct(warm, 50),
        "warm_ttft_p95_s": _pct(warm, 95),
        "tpot_p50_s": _pct(tpot, 50),
        "tpot_p95_s": _pct(tpot, 95),
        "hit_rate": sum(s.cached_tokens for s in samples) / prompt if prompt else 0.0,
        "wall_s": wall,
        "samples": [asdict(s) for s in samples],
    }


def _pct(xs: list[float], p: int) -> float:
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def run_isolated(size: BatchSizes) -> dict:
    """`run` in a fresh process. Why: libgomp slows every OpenMP team once more OpenMP threads exist
    than cores (it stops spinning between parallel regions), and a thread that ran torch keeps its
    team until it exits. Measured on 2 cores: one torch op on a live thread halved the engine's
    decode rate at concurrency 16 (~500 -> ~240 tokens/s). A worker actor runs torch on its engine
    thread alone; so does every mode here, each on a thread that ends with the mode, in a process
    whose main thread never runs torch."""
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run, size).result()


def run(size: BatchSizes, log=print) -> dict:
    """Every mode x workload x concurrency. Each mode starts from an empty cache per workload and
    concurrency level; the first request of each system prompt is then cold, the rest warm."""
    out: dict = {"sizes": asdict(size), "modes": MODES, "runs": {}}
    for workload in ("shared", "cold"):
        for c in size.concurrency:
            n = min(size.max_requests, max(size.min_requests, size.waves_per_client * c))
            work = prompts(size, workload, n, seed=c)
            # Warm-up, not timed: one unrelated prompt, and on `shared` each system prompt once (the
            # workload is about hot system prompts; a cold start is the `cold` workload's business).
            warmup = prompts(size, "cold", 1, seed=10_000 + c)
            if workload == "shared":
                warmup += prompts(size, "shared", size.systems, seed=20_000 + c)
            for mode in MODES:
                log(f"batching bench: {workload}, concurrency {c}, mode ({mode}) {MODES[mode]}, {n} requests ...")
                samples, wall = _one_mode(mode, size, warmup, work, c)
                out["runs"][f"{workload}/{c}/{mode}"] = summarize(samples, wall)
    with ThreadPoolExecutor(1) as torch_thread:
        out["suffix_limit_s"] = torch_thread.submit(suffix_limit, size).result()
        out["attention"] = torch_thread.submit(attention_modes, size).result()
    out["goals"] = goals(out)
    return out


def _one_mode(mode: str, size: BatchSizes, warmup, work, c: int) -> tuple[list[Sample], float]:
    """One mode's closed loop; its torch work runs on one thread that ends with it."""
    from worker.engine import Engine
    from worker.models import load_model

    if mode in ("i", "ii"):
        engine = Engine.on_own_thread(
            lambda: Engine.from_pretrained(
                "demo", device="cpu", device_cache_gb=1.0, host_cache_gb=0, max_running=None if mode == "i" else 1
            )
        )
        try:
            serve = engine_server(engine, size.new_tokens)
            closed_loop(serve, warmup, 1)
            return closed_loop(serve, work, c)
        finally:
            engine.close()
    with ThreadPoolExecutor(1) as torch_thread:
        model = torch_thread.submit(load_model, "demo", torch.device("cpu"), torch.float32).result().model
        if mode == "iv":
            serve = plain_server(model, size.new_tokens, torch_thread)
            closed_loop(serve, warmup, 1)
            return closed_loop(serve, work, c)
    # (iii): the manager is built on a thread that then ends; it steps on its own thread
    with ThreadPoolExecutor(1) as builder:
        cb = builder.submit(TransformersCB, model, size.new_tokens, 256).result()
    try:
        closed_loop(cb.serve, warmup, 1)
        return closed_loop(cb.serve, work, c)
    finally:
        cb.close()


def attention_modes(size: BatchSizes) -> dict[str, dict[str, float]]:
    """Step time of each attention backend (worker.paged_attention) usable here on the same batches:
    `decode`, one token for each of 16 requests at a system prompt's context; `mixed`, the same plus
    a prefill chunk. Median of 5 steps; the engine's "auto" picks the faster."""
    from worker.engine import Engine
    from worker.paged_attention import resolve_backend

    engine = Engine.from_pretrained("demo", device="cpu", device_cache_gb=1.0, host_cache_gb=0, max_running=32)
    seqs = [engine.submit(Request(ids, max_new_tokens=4000)) for ids in prompts(size, "shared", 16, seed=7)]
    while any(s.prefilling or not s.out for s in seqs):
        engine._step()
    for s in seqs:
        engine.blocks.reserve(s, 1)  # the table covers each request's next token
    out: dict[str, dict[str, float]] = {}
    for mode in sorted({resolve_backend("auto", engine.device), "sdpa"}):
        engine.runner.backend = mode
        out[mode] = {}
        for shape in ("decode", "mixed"):
            batch = [(s, 1) for s in seqs]
            if shape == "mixed":
                batch.append((engine.submit(Request(prompts(size, "cold", 1, seed=8)[0], max_new_tokens=1)), 0))
                engine._reap()
                extra = engine.scheduler.waiting.popleft()
                engine.blocks.open_table(extra)
                n = min(extra.to_feed, 128)
                engine.blocks.reserve(extra, n)
                batch[-1] = (extra, n)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                engine.runner.run(batch)  # rewrites the same slots each time: no state moves
                times.append(time.perf_counter() - t)
            out[mode][shape] = statistics.median(times)
            if shape == "mixed":
                engine.scheduler.finish(extra)
    for s in seqs:
        engine.cancel(s)
    engine.close()
    return out


def goals(out: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for the four batching goals, from one run's numbers."""
    runs, cs = out["runs"], out["sizes"]["concurrency"]
    rate = {k: v["out_tok_per_s"] for k, v in runs.items()}
    rows = []
    if 16 in cs:
        x = rate["shared/16/i"] / rate["shared/16/ii"]
        rows.append(("(i) >= 4x (ii) output tokens/s at concurrency 16 (shared)", f"{x:.1f}x", x >= 4))
    worst = min((rate[f"{w}/{c}/i"] / rate[f"{w}/{c}/iii"], f"{w}, c={c}") for w in ("shared", "cold") for c in cs)
    rows.append(
        ("(i) >= (iii) output tokens/s at every concurrency", f"lowest {worst[0]:.2f}x ({worst[1]})", worst[0] >= 1)
    )
    hi = 16 if 16 in cs else max(cs)
    a, b = runs[f"shared/{hi}/i"]["warm_ttft_p95_s"], runs["shared/1/i"]["warm_ttft_p95_s"]
    rows.append(
        (f"warm TTFT p95 at concurrency {hi} <= 2x concurrency 1", f"{a * 1e3:.0f} ms vs {b * 1e3:.0f} ms", a <= 2 * b)
    )
    w1, lim = runs["shared/1/i"]["warm_ttft_p50_s"], out["suffix_limit_s"]
    rows.append(
        (
            "warm TTFT at concurrency 1 <= 1.15x the suffix-only limit",
            f"{w1 * 1e3:.1f} ms vs {lim * 1e3:.1f} ms ({w1 / lim:.2f}x)",
            w1 <= 1.15 * lim,
        )
    )
    return rows


def report_lines(out: dict) -> list[str]:
    """The BENCHMARKS.md section."""
    s = out["sizes"]
    lines = [
        SECTION,
        "",
        f"Demo model, one engine, CPU. Shared: {s['systems']} system prompts of {s['system_tokens']} tokens + "
        f"{s['suffix_tokens']}-token suffixes; cold: {s['cold_tokens']}-token prompts sharing nothing. Every request "
        f"generates {s['new_tokens']} tokens (greedy). `c` clients each send their next request when the last one "
        "finished; TTFT and time per output token (TPOT) are the engines' own per-token times from the request's arrival (queueing included). Each "
        "mode starts with an empty cache and an untimed warm-up (on `shared`: one request per system prompt, so "
        "the prompts are hot, as in a serving system that has been up for a while). Modes: "
        + "; ".join(f"({k}) {v}" for k, v in MODES.items())
        + ".",
        "",
        "| workload | c | mode | out tok/s | TTFT p50 | TTFT p95 | warm TTFT p95 | TPOT p50 | TPOT p95 | hit rate |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in out["runs"].items():
        w, c, m = key.split("/")
        lines.append(
            f"| {w} | {c} | ({m}) | {r['out_tok_per_s']:.1f} | {r['ttft_p50_s'] * 1e3:.0f} ms | "
            f"{r['ttft_p95_s'] * 1e3:.0f} ms | {r['warm_ttft_p95_s'] * 1e3:.0f} ms | {r['tpot_p50_s'] * 1e3:.1f} ms | "
            f"{r['tpot_p95_s'] * 1e3:.1f} ms | {100 * r['hit_rate']:.1f}% |"
        )
    att = out.get("attention", {})
    if att:
        lines += [
            "",
            "Attention per step, the two ways `worker/paged_attention.py` can run it (median step time; "
            "`decode`: 16 requests at a system prompt's context, one token each; `mixed`: the same plus a "
            "128-token prefill chunk). The faster is the default.",
            "",
            "| attention | decode step | mixed step |",
            "|---|---:|---:|",
        ]
        lines += [f"| {m} | {v['decode'] * 1e3:.1f} ms | {v['mixed'] * 1e3:.1f} ms |" for m, v in att.items()]
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else '**no**'} |" for g, m, ok in out["goals"]]
    return lines + [""]


def suffix_limit(size: BatchSizes) -> float:
    """Seconds of the model's forward over just a shared request's suffix, on top of a prebuilt KV
    cache of its system prompt (plain transformers, nothing else running): the floor for warm TTFT.
    Median of 5."""
    import copy

    from transformers import DynamicCache

    from worker.models import load_model

    model = load_model("demo", torch.device("cpu"), torch.float32).model
    ids = prompts(size, "shared", 1, seed=99)[0]
    prefix, suffix = ids[: size.system_tokens], ids[size.system_tokens :]
    times = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(torch.tensor([prefix]), cache=cache, use_cache=True)
        for _ in range(6):
            kv = copy.deepcopy(cache)
            t = time.perf_counter()
            model(torch.tensor([suffix]), cache=kv, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])
