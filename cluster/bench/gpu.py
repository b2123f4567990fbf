"""The GPU benchmark of issue 19, one command for a lent GPU machine: `python -m cluster.bench.gpu`.

On a ~1B-parameter Llama config in bfloat16 (random weights, 4k context; nothing to download), on
the device it finds:
  - the memory bandwidth, measured (a device-to-device copy; bytes read + written per second);
  - closed loop at c = 1, 4, 16, 64 (2 waves of c requests of ~3.5k random prompt tokens, 128 new
    tokens each, EOS ignored): output tok/s, TTFT and TPOT;
  - the same requests as c=64 with `max_running=1` (one at a time), for the batching speed-up;
  - the decode step with 1, 4, 16 and 64 requests running (median of timed steps), with CUDA
    graphs (worker.cuda_graphs, the default) and eager, against its roofline: the bytes a step
    must read (every weight but the embedding table, and each running request's KV) over the
    measured bandwidth.
Goals (issue 19): the decode step at 64 running <= 2x its roofline; c=64 >= 20x the output tok/s
of max_running=1. Prints a report and writes it, with the raw numbers, under --out (and, with
--write, into BENCHMARKS.md). `--size tiny --device cpu` runs the same code in seconds (its test).

`make gpu-check` (deploy/gpu-check.sh) runs this after the CUDA tests; `make gpu-wheels` puts the
wheels the GPU image lacks in .whl/ for the device tool to carry.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.bench import peer_driver as d
from cluster.bench.peer_ours import EngineBackend
from cluster.bench.peer_vllm import REPO, phase_stats, write_section

SECTION = "## GPU: the engine on a ~1B Llama in bfloat16 (issue 19)"
COMMAND = "python -m cluster.bench.gpu"
RESULTS = "bench-results-gpu.json"


@dataclass(frozen=True)
class Size:
    """A model config (Llama) and the workload scaled to it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int  # max_position_embeddings
    prompt_tokens: int
    new_tokens: int
    concurrency: tuple[int, ...]
    waves: int
    decode_running: tuple[int, ...]
    decode_steps: int
    serial_requests: int  # requests of the max_running=1 run
    cache_gb: float


SIZES = {
    # Llama-3.2-1B's shape with a 32k vocabulary: 1.1B parameters, 2.2 GB in bfloat16; KV 32 KiB per token.
    "1b": Size(2048, 8192, 16, 32, 8, 32000, 4096, 3584, 128, (1, 4, 16, 64), 2, (1, 4, 16, 64), 24, 8, 24.0),
    "tiny": Size(64, 128, 2, 4, 2, 512, 512, 96, 8, (1, 4), 1, (1, 4), 4, 2, 0.05),
}


def environment(device: torch.device) -> dict:
    """What ran: the device by name, the versions, and a check that the transformers APIs the
    engine relies on are there (importing the engine fails loudly where they are not)."""
    import transformers

    from worker import engine  # noqa: F401  (the check)

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def bandwidth(device: torch.device, gib: float) -> float:
    """Bytes per second a device-to-device copy moves, counting what it reads and what it writes."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(size: Size, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama of `size` on `device`, as the engine loads models (`LoadedModel`)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from worker.models import LoadedModel, probe_layout

    cfg = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.context,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    vocab = {f"t{i}": i for i in range(size.vocab)}  # one word per id: any id detokenizes
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    return LoadedModel("llama-1b-random", model, tok, probe_layout(model), size.context, size.vocab, frozenset())


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: all but the embedding table (a step reads a few rows)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def make_engine(loaded, size: Size, device: torch.device, **batching):
    from cache_store import CacheConfig
    from worker.engine import Engine, EngineConfig

    cfg = CacheConfig.from_gb(size.cache_gb, 0.0)
    return lambda: Engine(loaded, cfg, device=device, engine_config=EngineConfig(**batching))


def prompts(size: Size, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, size.vocab) for _ in range(size.prompt_tokens)] for _ in range(n)]


def closed_loop(backend: EngineBackend, size: Size, log) -> dict[str, dict]:
    out = {}
    for c in size.concurrency:
        backend.reset()
        ps = prompts(size, c * size.waves, seed=c)
        records, wall = d.drive(backend, ps, size.new_tokens, c)
        out[f"c={c}"] = phase_stats({"wall_s": wall, "records": [r.__dict__ for r in records]}, size.new_tokens)
        log(f"  c={c}: {out[f'c={c}']['out_tok_per_s']:.1f} tok/s")
    return out


def decode_steps(engine, size: Size, kv_bytes_per_token: int) -> dict[str, dict]:
    """Per running count N: N requests prefilled, then the median of timed decode steps (the engine
    stepped on this thread: nothing else in flight), with the KV bytes those steps read."""
    from worker.request import Request, Result

    out = {}
    new = size.decode_steps + 4
    for n in size.decode_running:
        engine.reset_prefix_cache()
        seqs = [
            engine.submit(Request(p, max_new_tokens=new, ignore_eos=True, min_tokens=new, id=f"d{i}"))
            for i, p in enumerate(prompts(size, n, seed=100 + n))
        ]
        refused = [s.error for s in seqs if isinstance(s, Result)]
        if refused:
            raise RuntimeError(f"the engine refused a decode-step request: {refused[0]}")
        while any(s.to_feed > 1 for s in seqs) or len(engine.scheduler.running) < n:
            engine._step()
        engine._step()
        times, ctx = [], []
        for _ in range(size.decode_steps):
            ctx.append(sum(s.kv_len + 1 for s in seqs))
            t0 = time.perf_counter()
            engine._step()
            sync(engine.device)
            times.append(time.perf_counter() - t0)
        for s in seqs:
            engine.cancel(s)
        engine._step()
        out[str(n)] = {"step_s": statistics.median(times), "kv_bytes": statistics.median(ctx) * kv_bytes_per_token}
    return out


def run(size_name: str, device: torch.device, dtype: torch.dtype, log=print) -> dict:
    size = SIZES[size_name]
    t_start = time.perf_counter()
    env = environment(device)
    log(f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}")
    bw = bandwidth(device, 2.0 if device.type == "cuda" else 0.25)
    log(f"memory bandwidth (copy, read + write): {bw / 1e9:.0f} GB/s")
    loaded = build_model(size, device, dtype)
    lay = loaded.layout
    kv_token = lay.layers * 2 * lay.kv_heads * lay.head_dim * torch.empty(0, dtype=dtype).element_size()
    weights = weight_bytes(loaded.model)
    params = sum(p.numel() for p in loaded.model.parameters())
    log(f"model: {params / 1e9:.3g}B parameters, {weights / 1e9:.3g} GB read per step, KV {kv_token} B/token")

    backend = EngineBackend(make_engine(loaded, size, device))
    info = backend.info()
    log(f"engine: attention {info.get('attention')}, max_running {info.get('max_running')}, closed loop:")
    loop = closed_loop(backend, size, log)
    backend.engine.close()

    serial = EngineBackend(make_engine(loaded, size, device, max_running=1))
    ps = prompts(size, size.serial_requests, seed=999)
    records, wall = d.drive(serial, ps, size.new_tokens, len(ps))
    one = phase_stats({"wall_s": wall, "records": [r.__dict__ for r in records]}, size.new_tokens)
    serial.engine.close()
    log(f"  max_running=1: {one['out_tok_per_s']:.1f} tok/s")

    steps, eager = {}, {}
    for graphs, into in (("auto", steps), ("off", eager)):
        engine = make_engine(loaded, size, device, cuda_graphs=graphs)()
        into.update(decode_steps(engine, size, kv_token))
        engine.close()
    for n, st in steps.items():
        st["roofline_s"] = (weights + st["kv_bytes"]) / bw
        st["eager_step_s"] = eager[n]["step_s"]
        log(
            f"  decode, {n} running: {st['step_s'] * 1e3:.2f} ms, eager {st['eager_step_s'] * 1e3:.2f} ms "
            f"(roofline {st['roofline_s'] * 1e3:.2f} ms)"
        )
    return {
        "size": size_name,
        "sizes": asdict(size),
        "dtype": str(dtype).removeprefix("torch."),
        "environment": env,
        "engine": info,
        "bandwidth_Bps": bw,
        "params": params,
        "weight_bytes": weights,
        "kv_bytes_per_token": kv_token,
        "closed_loop": loop,
        "serial": one,
        "decode": steps,
        "elapsed_s": time.perf_counter() - t_start,
    }


def goals(out: dict) -> list[tuple[str, str, bool]]:
    top = str(max(int(n) for n in out["decode"]))
    st = out["decode"][top]
    c = max(out["closed_loop"], key=lambda k: int(k.split("=")[1]))
    speedup = out["closed_loop"][c]["out_tok_per_s"] / out["serial"]["out_tok_per_s"]
    ratio = st["step_s"] / st["roofline_s"]
    return [
        (f"decode step at {top} running <= 2x its roofline", f"{ratio:.1f}x", ratio <= 2),
        (f"{c} output tok/s >= 20x max_running=1", f"{speedup:.1f}x", speedup >= 20),
    ]


def report_lines(out: dict) -> list[str]:
    env, s = out["environment"], out["sizes"]
    lines = [
        SECTION,
        "",
        f"Made by `{COMMAND}` on {env['date']} in {out['elapsed_s'] / 60:.1f} min. Device: {env['device']}; torch "
        f"{env['torch']}, transformers {env['transformers']}, Triton {env['triton']}, Python {env['python']}. "
        f"Model: Llama config, {out['params'] / 1e9:.2f}B parameters ({s['layers']} layers, hidden {s['hidden']}, "
        f"{s['heads']} heads, {s['kv_heads']} KV heads, vocabulary {s['vocab']}), random weights, {out['dtype']}, "
        f"{s['context']}-token context. Engine: attention `{out['engine'].get('attention')}`, CUDA graphs "
        f"`{out['engine'].get('cuda_graphs')}`, max_running "
        f"{out['engine'].get('max_running')}, max_batch_tokens {out['engine'].get('max_batch_tokens')}. Memory "
        f"bandwidth measured by a device-to-device copy: {out['bandwidth_Bps'] / 1e9:.0f} GB/s (read + write).",
        "",
        f"Closed loop: {s['waves']} waves of c requests of {s['prompt_tokens']} random prompt tokens (no cache hits), "
        f"{s['new_tokens']} new tokens, EOS ignored.",
        "",
        "| run | output tok/s | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [*out["closed_loop"].items(), (f"max_running=1 ({s['serial_requests']} at once)", out["serial"])]
    for name, st in rows:
        lines.append(
            f"| {name} | {st['out_tok_per_s']:.1f} | {st['ttft_p50_s'] * 1e3:.0f} ms | {st['ttft_p95_s'] * 1e3:.0f} ms "
            f"| {st['tpot_p50_s'] * 1e3:.1f} ms | {st['tpot_p95_s'] * 1e3:.1f} ms |"
        )
    lines += [
        "",
        f"Decode step (median of {s['decode_steps']} steps) against its roofline: the weights read per step "
        f"({out['weight_bytes'] / 1e9:.2f} GB, the embedding table left out) plus each running request's KV, over "
        "the measured bandwidth.",
        "",
        "| running | step | step, eager (`cuda_graphs='off'`) | roofline | step / roofline |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, st in out["decode"].items():
        lines.append(
            f"| {n} | {st['step_s'] * 1e3:.2f} ms | {st['eager_step_s'] * 1e3:.2f} ms | {st['roofline_s'] * 1e3:.2f} ms "
            f"| {st['step_s'] / st['roofline_s']:.1f}x |"
        )
    lines += ["", "| goal | measured | met |", "|---|---:|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else 'no'} |" for g, m, ok in goals(out)]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default=".", help=f"directory for {RESULTS} and the report (gpu-report.md)")
    p.add_argument("--write", action="store_true", help="also put the report into BENCHMARKS.md")
    return p


def main(argv: list[str] | None = None, log=print) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = run(args.size, device, dtype, log=log)
    lines = report_lines(out)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULTS).write_text(json.dumps(out, indent=1))
    (folder / "gpu-report.md").write_text("\n".join(lines) + "\n")
    if args.write:
        write_section(lines, REPO / "BENCHMARKS.md", SECTION)
    log("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
