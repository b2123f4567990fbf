"""The CPU linear layers' packed layout (worker.linear): a row's numbers do not depend on how many
rows share the call, the layer stays a drop-in `nn.Linear`, and a mode that cannot run is refused."""

from __future__ import annotations

import pytest
import torch

from cache_store import ConfigError
from worker.config import EngineConfig
from worker.linear import PackedLinear, packed_available, prepare_linears

needs_onednn = pytest.mark.skipif(not packed_available(), reason="this torch has no oneDNN")


def packed_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(  # SmolLM2-135M's MLP shapes, where MKL's rows do depend on the batch
        torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576, bias=False)
    )
    plain = [m.weight.detach().clone() for m in model]
    return model, plain


@needs_onednn
def test_a_row_gets_the_same_bits_alone_and_in_any_batch():
    model, _ = packed_model()
    assert prepare_linears(model, "auto", torch.device("cpu"), torch.float32) == "packed"
    assert all(type(m) is PackedLinear for m in model)
    x = torch.randn(300, 576)
    with torch.inference_mode():
        full = model(x)
        for start, rows in ((0, 1), (3, 1), (0, 2), (5, 7), (17, 33), (100, 64), (1, 199)):
            assert torch.equal(model(x[start : start + rows]), full[start : start + rows]), (start, rows)
        # 3-D inputs (batch, tokens, features), as the model's layers pass them
        assert torch.equal(model(x[:40].reshape(1, 40, 576)).reshape(40, 576), full[:40])


@needs_onednn
def test_packing_changes_no_value_and_no_state():
    model, plain = packed_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_linears(model, "packed", torch.device("cpu"), torch.float32)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(8, 576)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(torch.nn.functional.linear(x, plain[0], model[0].bias), plain[1])
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_plain_leaves_nn_linear_and_a_mode_that_cannot_run_is_refused():
    model, _ = packed_model()
    assert prepare_linears(model, "plain", torch.device("cpu"), torch.float32) == "plain"
    assert all(type(m) is torch.nn.Linear for m in model)
    with pytest.raises(ConfigError, match="float32"):
        prepare_linears(packed_model()[0].to(torch.bfloat16), "packed", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="CPU layout"):
        prepare_linears(packed_model()[0], "packed", torch.device("meta"), torch.float32)
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


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_fused_siblings_give_each_layer_the_bits_of_its_own_gemm(bias):
    """q/k/v and gate/up run as one GEMM each; every output equals that layer alone, packed, bit for
    bit, whatever the rows, the order the members are called in, or a member called twice."""
    torch.manual_seed(2)
    fused, alone = Block(bias), Block(bias)
    alone.load_state_dict(fused.state_dict())
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    assert prepare_linears(fused, "packed", torch.device("cpu"), torch.float32) == "packed"
    for m in alone.modules():  # each layer packed on its own
        if type(m) is torch.nn.Linear:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().contiguous(), 16)
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
