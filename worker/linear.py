"""The model's linear layers on CPU: weight layouts that make a batched step's GEMMs cheaper.

A decode step multiplies a few rows (one per running request) by every weight of the model, so
its GEMMs read the whole model once and are bound by how the weights are laid out:

  - input-major (always on CPU): each weight [out, in] is stored as the transpose of a contiguous
    [in, out] (same values, shape and state dict; only the strides change), so `F.linear` hands
    MKL a matrix it need not transpose: 1.4-1.8x faster per GEMM at 16 and 64 rows, the same at 1.
  - kernel ("kernel", the CPU default for float32 where `worker.kernels` builds with AVX-512):
    beside it, a copy in panels of 16 output columns, multiplied by our own GEMM
    (`worker/kernels/linear_cpu.cpp`). Each output is one multiply-add chain over the input in
    order, whatever the rows, the tile or the thread: a row's bits are the same alone, in any batch
    and in a prefill chunk of any length, by construction.
  - packed ("packed", where torch has oneDNN): a copy reordered once into oneDNN's blocked layout.
    MKL's sgemm re-packs the weight on every call; oneDNN's packed kernel does not, and it
    computes each row with the same summation order whatever the number of rows from 2 on
    (checked: a row's bits are the same at 2 to 2,049 rows). Its one-row kernel sums in another
    order where the input is wider than 1,024, so a single row runs as two.

SmolLM2-135M's 30 layers + lm_head, AMD EPYC, 2 threads (BENCHMARKS.md, issue 19): MKL vs oneDNN
packed 15.6 vs 9.9 ms at 1 row, 52.5 vs 20.3 at 16, 107.2 vs 47.9 at 64; oneDNN packed vs kernel,
interleaved in one process (lm_head on at most 64 rows): 14.6 vs 13.9 ms at 1 row, 23-27 vs 17-22
at 16, 53 vs 47-50 at 64, 143-151 vs 145 at 256. Either packed copy costs a second copy of every
weight in host memory.

Sibling layers a block calls on the same input (q/k/v, gate/up) share one packed weight and one
GEMM (`fuse_siblings`): 2 calls fewer per layer, the input read once; every output column has the
same bits as in its own GEMM (oneDNN, whole model, separate vs fused: 21.0 vs 19.1 ms at 1 row,
27.3 vs 24.0 at 16, 54.3 vs 48.9 at 64).

The three differ by ~1e-5 per row (summation order); the exactness rules (invariant 1) are tested
on each ("plain" is MKL alone).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cache_store import ConfigError
from worker.config import LinearMode

CPU = torch.device("cpu")


def packed_available(device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's packed linear runs here: CPU, float32, a torch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def kernel_available(device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> bool:
    """Our GEMM runs here: CPU, float32, `worker.kernels` built with AVX-512."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    from worker import kernels

    return kernels.load() and bool(torch.ops.prefixcache.linear_supported())


def auto_linear(device: torch.device, dtype: torch.dtype) -> str:
    """What linear='auto' runs: the kernel, else oneDNN's packed layout, else plain."""
    if kernel_available(device, dtype):
        return "kernel"
    return "packed" if packed_available(device, dtype) else "plain"


def prepare_linears(model: torch.nn.Module, mode: LinearMode, device: torch.device, dtype: torch.dtype) -> str:
    """Lay out the model's linear weights for `mode`; returns what runs ("kernel", "packed" or
    "plain"), which `Engine.info()["linear"]` reports. A mode unavailable here is refused, not
    ignored."""
    if device.type != "cpu":
        if mode in PACKED_KINDS:
            raise ConfigError(f"linear={mode!r} is a CPU layout; use 'auto' or 'plain' on this device")
        return "plain"
    use_input_major_weights(model)
    kind = auto_linear(device, dtype) if mode == "auto" else mode
    if kind == "plain":
        return "plain"
    if kind == "kernel" and not kernel_available(device, dtype):
        raise ConfigError(
            f"linear='kernel' needs float32 weights and worker.kernels built with AVX-512 (dtype {dtype}); "
            "use 'auto', 'packed' or 'plain'"
        )
    if kind == "packed" and not packed_available(device, dtype):
        raise ConfigError(
            f"linear='packed' needs float32 weights and a torch with oneDNN (dtype {dtype}, oneDNN "
            f"{torch.backends.mkldnn.is_available()}); use 'auto' or 'plain'"
        )
    fuse_siblings(model, kind)
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.packed = PackedWeight.of(kind, module.weight, module.bias)
            module.__class__ = PackedLinear
    return kind


# Sibling layers a decoder block calls on the same input, one after another (every supported model
# names them so): one GEMM for the group reads the input once and runs 2 calls fewer per layer.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
PACKED_KINDS = ("kernel", "packed")


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight [out, in] (and its bias) laid out once for one GEMM kind; `self(x)` is
    `F.linear(x, weight, bias)` up to summation order, for x [..., in]."""

    kind: str  # one of PACKED_KINDS
    packed: torch.Tensor
    bias: torch.Tensor | None
    out_features: int

    @classmethod
    def of(cls, kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedWeight:
        w = weight.detach().contiguous()
        if kind == "kernel":
            packed = torch.ops.prefixcache.pack_linear(w)
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        return cls(kind, packed, None if bias is None else bias.detach().contiguous(), weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        if self.kind == "kernel":
            y = torch.ops.prefixcache.linear(flat, self.packed, self.bias, self.out_features)
        else:  # oneDNN: one row runs as two (its one-row kernel sums in another order)
            two = flat.expand(2, flat.shape[1]).contiguous() if rows == 1 else flat
            y = torch.ops.mkldnn._linear_pointwise(two, self.packed, self.bias, "none", [], "")[:rows]
        return y.reshape(*x.shape[:-1], self.out_features)


def fuse_siblings(model: torch.nn.Module, kind: str) -> int:
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
            group = _FusedGroup(members, kind)
            for i, m in enumerate(members):
                m.group, m.index = group, i
                m.__class__ = FusedLinear
            fused += 1
    return fused


class _FusedGroup:
    """One GEMM for sibling layers; holds the outputs of the last input until each member took its
    own (per thread, so forwards on two threads never take each other's)."""

    def __init__(self, members: list[torch.nn.Linear], kind: str):
        bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self.packed = PackedWeight.of(kind, torch.cat([m.weight.detach() for m in members]), bias)
        self.widths = [m.out_features for m in members]
        self._held = threading.local()  # .input: the tensor the outputs are of; .outs: one per member

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        held = self._held
        if getattr(held, "input", None) is not x or held.outs[index] is None:  # a new input, or a repeat
            held.outs = list(self.packed(x).split(self.widths, -1))
            held.input = x
        out, held.outs[index] = held.outs[index], None
        if all(o is None for o in held.outs):
            held.input = None  # every member has its output: hold nothing between steps
        return out  # type: ignore[return-value]


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
    """`nn.Linear` with a packed copy of its weight (`packed`, not in the state dict) used for
    every call. Made only by `prepare_linears` (inference: no autograd)."""

    packed: PackedWeight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return self.packed(x)


class FusedLinear(torch.nn.Linear):
    """A member of a fused group (`fuse_siblings`): its output comes from the group's one GEMM. Its
    own weight and bias stay in the state dict, unchanged."""

    group: _FusedGroup
    index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return self.group.output(x, self.index)
