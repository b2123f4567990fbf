"""Decode steps as CUDA graphs (worker.cuda_graphs).

On CPU: the captured code, `ModuleForward` (the model's modules layer by layer), gives the bits
of the model's own forward through the same paged steps, for every Llama-family model, and
covers nothing else; the graphs' inputs, padding rows and block tables, run eagerly, give the
unpadded engine's tokens and touch no block but the scratch one; the capture sizes; the engine
reports graphs off with the reason.
On CUDA (the GPU machine runs these: deploy/gpu-check.sh): graphs are captured, serve the decode
steps, and give the eager engine's greedy tokens, at batch sizes that need padding rows, from
the cache too.
"""

from __future__ import annotations

import pytest
import torch

from cache_store import CacheConfig, KVShape
from worker import kernels
from worker.cuda_graphs import DecodeGraphs, ModuleForward, capture_sizes
from worker.engine import Engine, EngineConfig
from worker.models import load_model

from .reference import rand_ids, reference, tiny_engine

PROMPTS = [rand_ids(n, seed=n) for n in (1, 9, 40, 130)]


def test_capture_sizes_are_powers_of_two_then_multiples_of_16_up_to_max_running():
    assert capture_sizes(1) == (1,)
    assert capture_sizes(3) == (1, 2, 3)
    assert capture_sizes(16) == (1, 2, 4, 8, 16)
    assert capture_sizes(40) == (1, 2, 4, 8, 16, 32, 40)
    assert capture_sizes(256)[-3:] == (224, 240, 256) and len(capture_sizes(256)) == 20


def cpu_engine(tiny_dirs, name: str) -> Engine:
    return tiny_engine(tiny_dirs, name, forward="transformers")


@pytest.mark.parametrize("name", ["demo", "llama", "qwen2", "mistral"])
def test_the_module_forward_has_the_bits_of_the_models_own_forward(tiny_dirs, name):
    own, modules = cpu_engine(tiny_dirs, name), cpu_engine(tiny_dirs, name)
    try:
        assert own.info()["cuda_graphs"] == "off: not a CUDA device"
        modules.runner.lean = ModuleForward.build(modules.model)  # the runner calls it as it calls the lean forward
        assert modules.runner.lean is not None
        for ids in PROMPTS:
            for use_cache in (False, True):
                a, _ = own.prefill_logits(ids, use_cache=use_cache)
                b, _ = modules.prefill_logits(ids, use_cache=use_cache)
                assert torch.equal(a, b), (len(ids), use_cache)
        got = modules.generate(PROMPTS, max_new_tokens=8)  # batched decodes and prefill chunks
        assert [r.token_ids for r in got] == [r.token_ids for r in own.generate(PROMPTS, max_new_tokens=8)]
    finally:
        own.close()
        modules.close()


def test_the_module_forward_covers_only_llama_family_models(tiny_dirs):
    loaded = load_model(str(tiny_dirs["gemma"]), torch.device("cpu"), torch.float32)
    assert ModuleForward.build(loaded.model) is None  # Gemma scales its embeddings in the model's forward


@pytest.mark.skipif(not kernels.load(), reason="needs the CPU attention kernel (padding rows of query length 0)")
def test_padded_decode_steps_through_the_graph_inputs_give_the_engines_tokens(tiny_dirs):
    plain, padded = cpu_engine(tiny_dirs, "demo"), cpu_engine(tiny_dirs, "demo")
    try:
        (scratch,) = padded.store.alloc_working(1)
        graphs = DecodeGraphs(
            ModuleForward.build(padded.model),
            padded.store.device_pool.data,
            padded.runner.tables,
            scratch,
            sizes=(2, 8),  # 1 decode runs as 2 rows, 3-8 as 8; more run the runner's own path
            backend="cpu_kernel",
        )
        padded.runner.graphs = graphs
        prompts = PROMPTS + [rand_ids(23, seed=5), rand_ids(70, seed=6)]
        for batch in (prompts[:1], prompts[:3], prompts):
            want = [r.token_ids for r in plain.generate(batch, max_new_tokens=8)]
            before = graphs.steps
            assert [r.token_ids for r in padded.generate(batch, max_new_tokens=8)] == want
            assert graphs.steps > before
            # the cache the padded steps wrote serves the same tokens again
            assert [r.token_ids for r in padded.generate(batch, max_new_tokens=8)] == want
        ids = prompts[2]  # and plain transformers' generate(), through the padded steps alone
        assert tuple(padded.generate([ids], max_new_tokens=6)[0].token_ids) == reference(padded, ids)[0]
        padded.store.check_invariants()
    finally:
        plain.close()
        padded.close()


CUDA = torch.device("cuda")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_engine(dtype: torch.dtype, cuda_graphs: str, max_running: int = 24) -> Engine:
    loaded = load_model("demo", CUDA, dtype)
    lay = loaded.layout
    bs = CacheConfig.block_size
    block = KVShape(lay.layers, lay.kv_heads, bs, lay.head_dim, dtype).block_bytes
    cfg = CacheConfig(block_size=bs, device_bytes=512 * block, host_bytes=0)
    config = EngineConfig(max_running=max_running, cuda_graphs=cuda_graphs)
    return Engine(loaded, cfg, device=CUDA, engine_config=config)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_replay_graphs_with_the_eager_engines_tokens(dtype):
    graphed, eager = cuda_engine(dtype, "auto"), cuda_engine(dtype, "off")
    try:
        assert graphed.info()["cuda_graphs"] == "decode steps, 6 sizes up to 24", graphed.info()["cuda_graphs"]
        assert eager.info()["cuda_graphs"].startswith("off")
        for n in (1, 3, 17):  # 3 and 17 run with padding rows (sizes 4 and 24)
            prompts = [rand_ids(5 + 7 * i, seed=100 * n + i) for i in range(n)]
            before = graphed.runner.graphs.steps
            got = [r.token_ids for r in graphed.generate(prompts, max_new_tokens=12)]
            assert graphed.runner.graphs.steps > before
            assert got == [r.token_ids for r in eager.generate(prompts, max_new_tokens=12)], n
            # again, from the cache the first run wrote while graphs decoded beside it
            assert got == [r.token_ids for r in graphed.generate(prompts, max_new_tokens=12)], n
        ids = rand_ids(40, seed=7)
        assert tuple(graphed.generate([ids], max_new_tokens=6)[0].token_ids) == reference(graphed, ids)[0]
        graphed.store.check_invariants()  # the scratch block is a working block, nothing leaks
    finally:
        graphed.close()
        eager.close()
