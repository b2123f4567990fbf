"""The lean decoder forward (worker.lean) and its fused CPU ops: each op equals the eager formula
transformers runs, row by row and with the same bits in any batch; the lean forward gives the
tokens and logits of the model's own forward; it runs where it applies and is refused, saying what
to change, where it does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from cache_store import ConfigError
from worker import kernels
from worker.engine import Engine, EngineConfig
from worker.linear import auto_linear

from .reference import assert_logits_close, rand_ids, reference, tiny_engine

pytestmark = pytest.mark.skipif(
    not kernels.load() or auto_linear(torch.device("cpu"), torch.float32) == "plain",
    reason="needs the CPU kernels and a packed linear layout",
)
OPS = torch.ops.prefixcache if kernels.load() else None
EPS = 1e-5


def strided_rows(t: int, n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """[t, n] rows that are a column window of a wider tensor (as q/k/v are of the fused output)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, n + 40, generator=g) * scale)[:, 17 : 17 + n]


def rms_ref(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def test_rms_norm_and_add_rms_norm_are_transformers_formula():
    x, w = strided_rows(37, 576, 0, 3.0), torch.randn(576)
    out = torch.empty(37, 576)
    OPS.rms_norm(out, x, w, EPS)
    torch.testing.assert_close(out, rms_ref(x, w), rtol=1e-6, atol=1e-6)
    residual = torch.randn(37, 576)
    before = residual.clone()
    OPS.add_rms_norm(out, residual, x, w, EPS)
    assert torch.equal(residual, before + x)  # the residual add is exactly transformers'
    torch.testing.assert_close(out, rms_ref(before + x, w), rtol=1e-6, atol=1e-6)


def test_rope_is_transformers_apply_rotary_pos_emb():
    heads, kv_heads, d, t = 9, 3, 64, 29
    cfg = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv_heads)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d)
    q = qkv[:, : heads * d].view(t, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
    positions = torch.tensor([[3, 4, 5, 900, 901] + list(range(2000, 2024))])
    cos, sin = LlamaRotaryEmbedding(cfg)(qkv, positions)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    untouched = qkv[:, (heads + kv_heads) * d :].clone()
    OPS.rope(q, k, cos[0].contiguous(), sin[0].contiguous())
    torch.testing.assert_close(q, want_q[0].transpose(0, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(k, want_k[0].transpose(0, 1), rtol=1e-6, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], untouched)  # v is not touched


def test_silu_mul_matches_and_stays_finite_at_extremes():
    n = 1000 + 3  # a tail past the last 16 lanes
    gate_up = strided_rows(11, 2 * n, 1, 4.0).contiguous()
    gate_up[0, :8] = torch.tensor([-1e30, -1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4])
    out = torch.empty(11, n)
    OPS.silu_mul(out, gate_up)
    want = F.silu(gate_up[:, :n]) * gate_up[:, n:]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-6)


def test_each_op_gives_a_row_the_same_bits_in_any_batch():
    x, w = strided_rows(300, 576, 2, 2.0).contiguous(), torch.randn(576)
    gate_up = strided_rows(300, 3072, 3).contiguous()

    def run(lo, hi):
        xs = x[lo:hi].clone()
        a, b, c = torch.empty(hi - lo, 576), torch.empty(hi - lo, 576), torch.empty(hi - lo, 1536)
        OPS.rms_norm(a, xs, w, EPS)
        OPS.add_rms_norm(b, xs, a, w, EPS)
        OPS.silu_mul(c, gate_up[lo:hi])
        return torch.cat([a, b, c], 1)

    full = run(0, 300)
    for lo, hi in ((0, 1), (7, 8), (0, 2), (5, 40), (100, 300)):
        assert torch.equal(run(lo, hi), full[lo:hi]), (lo, hi)


def engine_for(tiny_dirs, name, forward="auto", attention="auto") -> Engine:
    return tiny_engine(tiny_dirs, name, forward=forward, attention=attention)


@pytest.mark.parametrize("name", ["demo", "llama", "qwen2", "mistral"])
def test_the_lean_forward_gives_the_models_own_tokens_and_logits(tiny_dirs, name):
    lean, own = engine_for(tiny_dirs, name), engine_for(tiny_dirs, name, forward="transformers")
    try:
        assert lean.info()["forward"] == "lean" and own.info()["forward"] == "transformers"
        prompts = [rand_ids(n, seed=n) for n in (1, 9, 40, 130)]
        got = lean.generate(prompts, max_new_tokens=8)
        assert [r.token_ids for r in got] == [r.token_ids for r in own.generate(prompts, max_new_tokens=8)]
        for ids, result in zip(prompts, got):
            assert tuple(result.token_ids[:6]) == reference(lean, ids)[0]
            logits, _ = lean.prefill_logits(ids)
            assert_logits_close(lean, ids, logits, reference(lean, ids, n_new=1)[1])
    finally:
        lean.close()
        own.close()


def test_a_model_the_lean_forward_does_not_cover_runs_its_own(tiny_dirs):
    engine = engine_for(tiny_dirs, "gemma")  # (1 + weight) RMSNorm, GELU: not the lean layer
    try:
        assert engine.info()["forward"] == "transformers"
        ids = rand_ids(20, seed=1)
        assert tuple(engine.generate([ids], max_new_tokens=6)[0].token_ids) == reference(engine, ids)[0]
    finally:
        engine.close()


def test_lean_where_it_cannot_run_is_refused_with_what_to_change(tiny_dirs):
    with pytest.raises(ConfigError, match="attention 'sdpa'.*use 'auto' or 'transformers'"):
        engine_for(tiny_dirs, "demo", forward="lean", attention="sdpa")
    with pytest.raises(ConfigError, match="forward must be one of"):
        EngineConfig(forward="fast").check()
