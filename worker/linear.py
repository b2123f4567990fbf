"""The model's linear layers on CPU: weight layouts that make a batched step's GEMMs cheaper.

A decode step multiplies a few rows (one per running request) by every weight of the model, so
its GEMMs read the whole model once and are bound by how the weights are laid out:

  - input-major (always on CPU): each weight [out, in] is stored as the transpose of a contiguous
    [in, out] (same values, shape and state dict; only the strides change), so `F.linear` hands
    MKL a matrix it need not transpose: 1.4-1.8x faster per GEMM at 16 and 64 rows, the same at 1.
  - packed ("packed", the CPU default for float32 where torch has oneDNN): beside it, a copy
    reordered once into oneDNN's blocked layout, used by every call. MKL's sgemm re-packs the
    weight on every call; oneDNN's packed kernel does not, and it computes each row with the same
    summation order whatever the number of rows from 2 on (checked: a row's bits are the same at 2
    to 2,049 rows). Its one-row kernel sums in another order where the input is wider than 1,024,
    so a single row runs as two (the same cost: 10.0 vs 9.9 ms for the whole model on AMD EPYC).
    So a request's linear layers give the same bits alone, in any batch and in a prefill of any
    length. SmolLM2-135M's 30 layers + lm_head, 2 threads (BENCHMARKS.md, issue 19), MKL vs
    packed: Intel Xeon 27.3 vs 25.1 ms at 2 rows, 45.5 vs 29.6 at 8, 51.2 vs 35.5 at 16, 68.2 vs
    70.8 at 64; AMD EPYC 15.6 vs 9.9 at 1 row, 52.5 vs 20.3 at 16, 107.2 vs 47.9 at 64. The cost:
    a second copy of every weight in host memory.

With "packed", sibling layers a block calls on the same input (q/k/v, gate/up) share one packed
weight and one GEMM (`fuse_siblings`): 2 calls fewer per layer, the input read once. The whole
model's GEMMs on AMD EPYC, 2 threads, separate vs fused: 21.0 vs 19.1 ms at 1 row, 27.3 vs 24.0 at
16, 54.3 vs 48.9 at 64; every output column has the same bits as in its own GEMM.

MKL and oneDNN differ by ~1e-5 per row (summation order); the exactness rules (invariant 1) are
tested on both ("plain" is MKL alone).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from cache_store import ConfigError
from worker.config import LinearMode

CPU = torch.device("cpu")


def packed_available(device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's packed linear runs here: CPU, float32, a torch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def prepare_linears(model: torch.nn.Module, mode: LinearMode, device: torch.device, dtype: torch.dtype) -> str:
    """Lay out the model's linear weights for `mode`; returns what runs ("packed" or "plain"), which
    `Engine.info()["linear"]` reports. "packed" where it is unavailable is refused, not ignored."""
    if device.type != "cpu":
        if mode == "packed":
            raise ConfigError("linear='packed' is a CPU layout (oneDNN); use 'auto' or 'plain' on this device")
        return "plain"
    use_input_major_weights(model)
    if mode == "plain" or (mode == "auto" and not packed_available(device, dtype)):
        return "plain"
    if not packed_available(device, dtype):
        raise ConfigError(
            f"linear='packed' needs float32 weights and a torch with oneDNN (dtype {dtype}, oneDNN "
            f"{torch.backends.mkldnn.is_available()}); use 'auto' or 'plain'"
        )
    fuse_siblings(model)
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.packed = _pack(module.weight)
            module.__class__ = PackedLinear
    return "packed"


# Sibling layers a decoder block calls on the same input, one after another (every supported model
# names them so): one GEMM for the group reads the input once and runs 2 calls fewer per layer.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)


def fuse_siblings(model: torch.nn.Module) -> int:
    """Give each FUSED_GROUPS group of sibling layers one packed weight (their rows stacked): the
    first member called on an input computes every member's output, the others take theirs. Each
    output column is the same dot product, summed in the same order, as in its own GEMM (checked
    bit for bit: tests/worker/test_linear.py). Returns the groups fused."""
    fused = 0
    for parent in model.modules():
        for names in FUSED_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(type(m) is torch.nn.Linear for m in members):
                continue
            if len({m.in_features for m in members}) > 1 or len({m.bias is None for m in members}) > 1:
                continue
            group = _FusedGroup(members)
            for i, m in enumerate(members):
                m.group, m.index = group, i
                m.__class__ = FusedLinear
            fused += 1
    return fused


class _FusedGroup:
    """One GEMM for sibling layers; holds the outputs of the last input until each member took its
    own (per thread, so forwards on two threads never take each other's)."""

    def __init__(self, members: list[torch.nn.Linear]):
        self.packed = _pack(torch.cat([m.weight.detach() for m in members]))
        self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self.widths = [m.out_features for m in members]
        self._held = threading.local()  # .input: the tensor the outputs are of; .outs: one per member

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        held = self._held
        if getattr(held, "input", None) is not x or held.outs[index] is None:  # a new input, or a repeat
            held.outs = list(_packed_linear(x, self.packed, self.bias, sum(self.widths)).split(self.widths, -1))
            held.input = x
        out, held.outs[index] = held.outs[index], None
        if all(o is None for o in held.outs):
            held.input = None  # every member has its output: hold nothing between steps
        return out  # type: ignore[return-value]


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """x [..., in] through a oneDNN-packed weight; one row runs as two (its one-row kernel sums in
    another order)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.expand(2, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), packed, bias, "none", [], "")
    return y[:rows].reshape(*x.shape[:-1], out_features)


def use_input_major_weights(model: torch.nn.Module) -> int:
    """Store every linear weight [out, in] as the transpose of a contiguous [in, out]. A tied
    embedding shares the layout (its lookups read strided rows: a few per step). Returns the
    layers changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous() and module.weight.dim() == 2:
            module.weight.data = module.weight.data.t().contiguous().t()
            changed += 1
    return changed


class PackedLinear(torch.nn.Linear):
    """`nn.Linear` with a oneDNN-packed copy of its weight (`packed`, not in the state dict) used
    for every call. Made only by `prepare_linears` (inference: no autograd)."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _packed_linear(x, self.packed, self.bias, self.out_features)


class FusedLinear(torch.nn.Linear):
    """A member of a fused group (`fuse_siblings`): its output comes from the group's one GEMM. Its
    own weight and bias stay in the state dict, unchanged."""

    group: _FusedGroup
    index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return self.group.output(x, self.index)
