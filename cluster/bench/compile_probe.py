"""`python -m cluster.bench.compile_probe`: what `torch.compile` buys transformers' own forward on
this CPU, beside our lean forward, one decode step at one running request (issue 19's third item).

Three forwards of SmolLM2-135M-Instruct in float32, 2 threads, each decoding one token after a
512-token prompt: transformers' model with a `StaticCache` (the cache shape `torch.compile` needs),
eager and compiled by inductor (default options, then with `freezing`, which also prepacks the
weights for oneDNN as ours are); and our `Engine` (lean forward, packed linears, paged kernel), the
median gap between one request's tokens. Compile time is the first two calls. Writes its section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

SECTION = "## torch.compile of transformers' forward, measured (issue 19)"
CONTEXT = 512
STEPS = 24


def _hf_steps(model_dir: Path, freezing: bool | None) -> tuple[float, float]:
    """(median ms per decode step, compile seconds; 0 when eager) of transformers' own forward."""
    import torch._dynamo
    import torch._inductor.config as inductor
    from transformers import AutoModelForCausalLM, StaticCache

    from worker.models import cache_kwargs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache = StaticCache(config=model.config, max_cache_len=CONTEXT + STEPS + 8)
    with torch.inference_mode():
        prompt = torch.randint(0, model.config.vocab_size, (1, CONTEXT))
        kw = cache_kwargs(model, cache)
        model(input_ids=prompt, use_cache=True, cache_position=torch.arange(CONTEXT), **kw)

    def step(pos: int):
        ids = torch.tensor([[5]])
        return model(input_ids=ids, use_cache=True, cache_position=torch.tensor([pos]), **kw).logits

    compile_s = 0.0
    if freezing is not None:
        torch._dynamo.reset()
        inductor.freezing = freezing
        step = torch.compile(step)
        t = time.perf_counter()
        with torch.inference_mode():
            step(CONTEXT), step(CONTEXT + 1)
        compile_s = time.perf_counter() - t
    times = []
    with torch.inference_mode():
        for i in range(STEPS):
            t = time.perf_counter()
            step(CONTEXT + 2 + i)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, compile_s


def _ours_step() -> float:
    """Median gap between one request's tokens on our engine (the lean forward), ms."""
    from worker.engine import Engine

    engine = Engine.from_pretrained("smollm2", device="cpu", dtype="float32", device_cache_gb=0.5, host_cache_gb=0)
    try:
        stamps: list[float] = []
        prompt = [(7 + 13 * i) % 40000 for i in range(CONTEXT)]
        for _ in engine.stream(prompt, max_new_tokens=STEPS + 1, ignore_eos=True, min_tokens=STEPS + 1):
            stamps.append(time.perf_counter())
        assert engine.info()["forward"] == "lean", engine.info()["forward"]
    finally:
        engine.close()
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return statistics.median(gaps) * 1e3


def run() -> dict:
    from worker.smollm2 import model_dir

    torch.set_num_threads(2)
    path = model_dir()
    eager, _ = _hf_steps(path, None)
    default, default_s = _hf_steps(path, False)
    frozen, frozen_s = _hf_steps(path, True)
    return {
        "eager_ms": eager,
        "compiled_ms": default,
        "compile_s": default_s,
        "frozen_ms": frozen,
        "frozen_compile_s": frozen_s,
        "ours_ms": _ours_step(),
        "torch": torch.__version__,
    }


def report(res: dict) -> list[str]:
    from cluster.bench.suite import machine

    m = machine()
    return [
        SECTION,
        "",
        f"Made by `python -m cluster.bench.compile_probe` on {time.strftime('%Y-%m-%d')}: {m['cpu']}, {m['cores']} "
        f"cores, torch {res['torch']}, transformers {m['transformers']}. SmolLM2-135M-Instruct, float32, 2 threads, "
        f"one request decoding after a {CONTEXT}-token prompt, median of {STEPS} steps.",
        "",
        "| forward | decode step | compile |",
        "|---|---:|---:|",
        f"| transformers, eager (StaticCache) | {res['eager_ms']:.1f} ms | - |",
        f"| transformers, `torch.compile` (inductor) | {res['compiled_ms']:.1f} ms | {res['compile_s']:.0f} s |",
        f"| transformers, `torch.compile` with freezing (weights prepacked) | {res['frozen_ms']:.1f} ms "
        f"| {res['frozen_compile_s']:.0f} s |",
        f"| ours: `Engine`, lean forward (worker/lean.py) | {res['ours_ms']:.1f} ms | - |",
        "",
        "Compiling transformers' forward gives back part of what eager dispatch costs, after a compile of "
        "about a minute per shape; the lean forward gives back more with none, so the workers run it and "
        "do not compile. (vLLM compiles its own model code at start-up: the ~65 s of its start-up.)",
    ]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.compile_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="directory holding BENCHMARKS.md (default: .)")
    p.add_argument("--no-report", action="store_true", help="print only")
    args = p.parse_args(argv)
    res = run()
    lines = report(res)
    print("\n".join(lines))
    if not args.no_report:
        from cluster.bench.report import put_section

        put_section(Path(args.out) / "BENCHMARKS.md", SECTION, lines)
    return res


if __name__ == "__main__":
    main()
