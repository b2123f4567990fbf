"""`python -m cluster.bench.gpu` (issue 19's GPU benchmark) run end to end at its tiny size on CPU,
so the command a lent GPU machine runs is known to work before one is lent: real forward passes,
the closed loop through the engine's own thread, the decode steps and their roofline."""

from __future__ import annotations

import json

import torch

from cluster.bench import gpu


def test_the_gpu_benchmark_runs_at_its_tiny_size_and_reports_against_the_roofline(tmp_path):
    lines: list[str] = []
    out = gpu.main(["--size", "tiny", "--device", "cpu", "--out", str(tmp_path)], log=lines.append)
    size = gpu.SIZES["tiny"]
    saved = json.loads((tmp_path / gpu.RESULTS).read_text())
    assert saved["environment"]["device"] and saved["environment"]["torch"] == torch.__version__
    assert set(out["closed_loop"]) == {f"c={c}" for c in size.concurrency}
    for c in size.concurrency:  # phase_stats refuses a request with another token count
        assert out["closed_loop"][f"c={c}"]["requests"] == c * size.waves
    assert out["serial"]["requests"] == size.serial_requests and out["serial"]["out_tok_per_s"] > 0
    # the roofline: weights but the embedding table, plus the running requests' KV, over the bandwidth
    lay = (size.layers, size.kv_heads, size.hidden // size.heads)
    assert out["kv_bytes_per_token"] == lay[0] * 2 * lay[1] * lay[2] * 4
    embed = size.vocab * size.hidden
    assert out["weight_bytes"] == (out["params"] - embed) * 4
    for n in size.decode_running:
        st = out["decode"][str(n)]
        assert st["kv_bytes"] >= n * size.prompt_tokens * out["kv_bytes_per_token"]
        assert st["roofline_s"] == (out["weight_bytes"] + st["kv_bytes"]) / out["bandwidth_Bps"]
        assert st["step_s"] > 0 and st["eager_step_s"] > 0
    report = (tmp_path / "gpu-report.md").read_text()
    assert report.startswith(gpu.SECTION) and "step / roofline" in report and "| goal |" in report
    assert out["engine"]["cuda_graphs"].startswith("off")  # on CPU; the GPU run reports its sizes
    assert len(gpu.goals(out)) == 2
