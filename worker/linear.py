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

MKL and oneDNN differ by ~1e-5 per row (summation order); the exactness rules (invariant 1) are
tested on both ("plain" is MKL alone).
"""

from __future__ import annotations

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
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().contiguous(), 16)
            module.__class__ = PackedLinear
    return "packed"


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
        rows = x.numel() // self.in_features
        if x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if rows == 1:  # oneDNN's one-row kernel sums in another order (K > 1024): run it as two rows
            flat = flat.expand(2, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.packed, self.bias, "none", [], "")
        return y[:rows].reshape(*x.shape[:-1], self.out_features)
