"""The CPU linear layers' packed layouts (worker.linear): our GEMM ("kernel") and oneDNN's
("packed"). A row's numbers do not depend on how many rows share the call, the layer stays a
drop-in `nn.Linear`, and a mode that cannot run is refused."""

from __future__ import annotations

import pytest
import torch

from cache_store import ConfigError
from worker.config import EngineConfig
from worker.linear import PackedLinear, PackedWeight, auto_linear, kernel_available, packed_available, prepare_linears

CPU = torch.device("cpu")
KINDS = [
    pytest.param(
        "kernel", marks=pytest.mark.skipif(not kernel_available(), reason="worker.kernels has no AVX-512 GEMM here")
    ),
    pytest.param("packed", marks=pytest.mark.skipif(not packed_available(), reason="this torch has no oneDNN")),
]


def packed_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(  # SmolLM2-135M's MLP shapes, where MKL's rows do depend on the batch
        torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576, bias=False)
    )
    plain = [m.weight.detach().clone() for m in model]
    return model, plain


def test_auto_runs_the_kernel_where_it_builds_else_onednn():
    expected = "kernel" if kernel_available() else "packed" if packed_available() else "plain"
    assert auto_linear(CPU, torch.float32) == expected
    assert auto_linear(CPU, torch.bfloat16) == "plain"
    model, _ = packed_model()
    assert prepare_linears(model, "auto", CPU, torch.float32) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(kind):
    model, _ = packed_model()
    assert prepare_linears(model, kind, CPU, torch.float32) == kind
    assert all(type(m) is PackedLinear and m.packed.kind == kind for m in model)
    x = torch.randn(300, 576)
    with torch.inference_mode():
        full = model(x)
        for start, rows in ((0, 1), (3, 1), (0, 2), (5, 7), (9, 8), (2, 9), (17, 33), (100, 64), (1, 199)):
            assert torch.equal(model(x[start : start + rows]), full[start : start + rows]), (start, rows)
        # 3-D inputs (batch, tokens, features), as the model's layers pass them
        assert torch.equal(model(x[:40].reshape(1, 40, 576)).reshape(40, 576), full[:40])


@pytest.mark.parametrize("kind", KINDS)
def test_packing_changes_no_value_and_no_state(kind):
    model, plain = packed_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_linears(model, kind, CPU, torch.float32)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(8, 576)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(torch.nn.functional.linear(x, plain[0], model[0].bias), plain[1])
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not kernel_available(), reason="worker.kernels has no AVX-512 GEMM here")
@pytest.mark.parametrize("out_features, in_features", [(1, 3), (17, 5), (40, 33), (100, 1)])
def test_the_kernel_takes_widths_that_are_not_whole_panels(out_features, in_features):
    """Output widths off the 16-column panels (the last panel is zero-padded and stored masked),
    with a bias, against float64; and no row beyond the ones asked is written."""
    torch.manual_seed(3)
    w, b = torch.randn(out_features, in_features), torch.randn(out_features)
    packed = PackedWeight.of("kernel", w, b)
    for rows in (1, 7, 8, 9, 23):
        x = torch.randn(rows, in_features)
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
        y = packed(x)
        assert y.shape == (rows, out_features)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not kernel_available(), reason="worker.kernels has no AVX-512 GEMM here")
def test_the_kernel_refuses_what_does_not_match_its_packed_weight():
    packed = PackedWeight.of("kernel", torch.randn(32, 16), None)
    with pytest.raises(RuntimeError, match="packed must come from pack_linear"):
        torch.ops.prefixcache.linear(torch.randn(2, 15), packed.packed, None, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.prefixcache.linear(torch.randn(2, 16), packed.packed, None, 48)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.prefixcache.linear(torch.randn(2, 16, dtype=torch.float64), packed.packed, None, 32)


def test_plain_leaves_nn_linear_and_a_mode_that_cannot_run_is_refused():
    model, _ = packed_model()
    assert prepare_linears(model, "plain", CPU, torch.float32) == "plain"
    assert all(type(m) is torch.nn.Linear for m in model)
    for kind in ("kernel", "packed"):
        with pytest.raises(ConfigError, match="float32"):
            prepare_linears(packed_model()[0].to(torch.bfloat16), kind, CPU, torch.bfloat16)
        with pytest.raises(ConfigError, match="CPU layout"):
            prepare_linears(packed_model()[0], kind, torch.device("meta"), torch.float32)
    with pytest.raises(ConfigError, match="linear must be one of"):
        EngineConfig(linear="fast").check()


class Block(torch.nn.Module):
    """A decoder block's linear layers under the names every supported model uses."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(576, n, bias=bias) for n in (576, 192, 192))
        self.gate_proj, self.up_proj = (torch.nn.Linear(576, 1536, bias=False) for _ in range(2))
        self.down_proj = torch.nn.Linear(1536, 576, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.sum(-1) + k.sum(-1) + v.sum(-1), self.down_proj(self.gate_proj(x) * self.up_proj(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_siblings_give_each_layer_the_bits_of_its_own_gemm(kind, bias):
    """q/k/v and gate/up run as one GEMM each; every output equals that layer alone, packed, bit for
    bit, whatever the rows, the order the members are called in, or a member called twice."""
    torch.manual_seed(2)
    fused, alone = Block(bias), Block(bias)
    alone.load_state_dict(fused.state_dict())
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    assert prepare_linears(fused, kind, CPU, torch.float32) == kind
    for m in alone.modules():  # each layer packed on its own
        if type(m) is torch.nn.Linear:
            m.packed = PackedWeight.of(kind, m.weight, m.bias)
            m.__class__ = PackedLinear
    assert [type(m).__name__ for m in fused.children()] == ["FusedLinear"] * 5 + ["PackedLinear"]
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in before.items())
    with torch.inference_mode():
        for rows in (1, 2, 17, 100):
            x = torch.randn(1, rows, 576)
            for a, b in zip(fused(x), alone(x)):
                assert torch.equal(a, b), rows
            names = ("v_proj", "q_proj", "v_proj", "k_proj", "gate_proj", "up_proj", "gate_proj")
            for name in names:  # another order, and v_proj / gate_proj twice on the same input
                assert torch.equal(getattr(fused, name)(x), getattr(alone, name)(x)), (rows, name)
