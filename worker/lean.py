"""A lean forward for Llama-family models (Llama, Mistral, Qwen2) on CPU: about 10 ops per decoder layer where eager
transformers runs about 125.

At a few running requests a CPU step is bound by dispatch, not arithmetic: SmolLM2-135M's GEMMs
take ~19 ms at one row, yet eager transformers' step took ~30 ms, most of the rest spent issuing
~3,700 small ops (RMSNorm alone is 7, RoPE 10, each with Python around it). vLLM gets the same
back by compiling the model; this module gets it by writing the layer out, as vLLM's and SGLang's
own model files do, with the elementwise parts as fused C++ ops (`worker.kernels`):

    x   = embed(ids)                               # the residual stream, [T, hidden]
    per layer:
      h   = rms_norm(x)            (first layer)   # else fused with the residual add below
      qkv = h @ Wqkv                               # one packed GEMM (`worker.linear` fused group)
      rope(q, k) in place; attention over the pool # `StepAttention.attend`: writes K/V, attends
      o   = attn @ Wo
      x  += o;  h = rms_norm(x)                    # add_rms_norm, one op
      h   = silu_mul(h @ Wgate_up) @ Wdown
      x  += h   (folded into the next layer's add_rms_norm)
    logits = rms_norm(x)[rows] @ W_lm_head

Every op is row by row or one of the packed GEMMs, so a request's bits are the same alone, in any
batch and in any prefill chunking, as on the transformers path. Arithmetic is transformers' (the
same formulas in float32); summation orders inside RMSNorm differ, so logits differ from the
transformers path by ~1e-6 (tests/worker/test_lean.py compares them).

Used only where every piece is as expected (`LeanLlama.build` returns None otherwise, and the
engine runs the model's own forward): a model type of `FAMILIES` (their decoder layers are the
same code: Qwen2 adds q/k/v biases, which the fused GEMM carries), SiLU MLP, float32 on CPU, the
paged CPU attention kernel and packed linear layers (either kind). `Engine.info()["forward"]` says
which runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.linear import PACKED_KINDS, FusedLinear, PackedLinear, PackedWeight
from worker.paged_attention import StepAttention

OPS = torch.ops.prefixcache
# model_type -> (the causal-LM class, its RMSNorm class): the models whose forward this is.
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaRMSNorm"),
    "mistral": ("MistralForCausalLM", "MistralRMSNorm"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2RMSNorm"),
}


@dataclass(frozen=True)
class _Layer:
    index: int
    norm_in: torch.Tensor  # [hidden]
    norm_post: torch.Tensor
    qkv: PackedWeight
    o: PackedWeight
    gate_up: PackedWeight
    down: PackedWeight


def _group(first: torch.nn.Module, names: tuple[str, ...], parent) -> PackedWeight | None:
    """The packed GEMM of a fused sibling group whose members are `names`, in that order."""
    if not isinstance(first, FusedLinear):
        return None
    group = first.group
    members = [getattr(parent, n, None) for n in names]
    if not all(isinstance(m, FusedLinear) and m.group is group for m in members):
        return None
    if [m.index for m in members] != list(range(len(names))) or len(group.widths) != len(names):
        return None
    return group.packed


def _single(m: torch.nn.Module) -> PackedWeight | None:
    return m.packed if isinstance(m, PackedLinear) else None


class LeanLlama:
    """`__call__(ids, positions, step, rows)` -> logits of `rows`; the model's own weights, read in
    place (nothing is copied)."""

    def __init__(self, model, layers: list[_Layer], final_norm: torch.Tensor, eps: float, shapes: tuple[int, int, int]):
        self.embed = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        self.lm_head = model.lm_head
        self.layers = layers
        self.final_norm = final_norm
        self.eps = eps
        self.heads, self.kv_heads, self.head_dim = shapes
        self.scale = model.model.layers[0].self_attn.scaling

    @classmethod
    def build(cls, model, *, device: torch.device, backend: str, linear: str) -> LeanLlama | None:
        """The lean forward for `model`, or None where it does not apply (the engine then runs the
        model's own forward)."""
        cfg = model.config
        if device.type != "cpu" or backend != "cpu_kernel" or linear not in PACKED_KINDS:
            return None
        lm_class, norm_class = FAMILIES.get(getattr(cfg, "model_type", None), (None, None))
        if type(model).__name__ != lm_class or getattr(cfg, "hidden_act", None) != "silu":
            return None
        if model.dtype != torch.float32:
            return None
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1) or not hasattr(model.model, "rotary_emb"):
            return None
        layers = []
        eps = None
        for i, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            parts = (
                _group(attn.q_proj, ("q_proj", "k_proj", "v_proj"), attn),
                _single(attn.o_proj),
                _group(mlp.gate_proj, ("gate_proj", "up_proj"), mlp),
                _single(mlp.down_proj),
            )
            norms = (block.input_layernorm, block.post_attention_layernorm)
            if any(p is None for p in parts) or getattr(attn, "layer_idx", None) != i:
                return None
            if not all(type(n).__name__ == norm_class for n in norms):
                return None
            if eps is None:
                eps = norms[0].variance_epsilon
            if any(n.variance_epsilon != eps for n in norms):
                return None
            layers.append(_Layer(i, norms[0].weight, norms[1].weight, *parts))
        final = model.model.norm
        if type(final).__name__ != norm_class or final.variance_epsilon != eps or not layers:
            return None
        attn = model.model.layers[0].self_attn
        shapes = (cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim)
        if shapes[0] * shapes[2] != layers[0].qkv.out_features - 2 * shapes[1] * shapes[2]:
            return None
        return cls(model, layers, final.weight, eps, shapes)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, step: StepAttention, rows: torch.Tensor):
        """ids, positions: [T]; rows: [n] indices into T. Returns logits [n, vocab]."""
        T = ids.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids)  # [T, hidden], a new tensor: the residual stream is updated in place
        cos, sin = self.rotary(x, positions.unsqueeze(0))
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        h = torch.empty_like(x)
        OPS.rms_norm(h, x, self.layers[0].norm_in, self.eps)
        act = None  # [T, intermediate]: the MLP's activation, one buffer for every layer
        pending = None  # the last MLP's output, added to x by the next add_rms_norm
        for layer in self.layers:
            if pending is not None:
                OPS.add_rms_norm(h, x, pending, layer.norm_in, self.eps)
            qkv = layer.qkv(h)  # [T, (H + 2 KV) D]
            q = qkv[:, : H * D].view(T, H, D)
            k = qkv[:, H * D : (H + KV) * D].view(T, KV, D)
            v = qkv[:, (H + KV) * D :].view(T, KV, D)
            OPS.rope(q, k, cos, sin)
            attn = step.attend(
                layer.index, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], self.scale
            )
            o = layer.o(attn.view(T, H * D))
            OPS.add_rms_norm(h, x, o, layer.norm_post, self.eps)
            gate_up = layer.gate_up(h)
            if act is None:
                act = torch.empty((T, gate_up.shape[1] // 2), dtype=x.dtype)
            OPS.silu_mul(act, gate_up)
            pending = layer.down(act)
        last = torch.empty((rows.shape[0], x.shape[1]), dtype=x.dtype)
        picked = x.index_select(0, rows)
        OPS.add_rms_norm(last, picked, pending.index_select(0, rows), self.final_norm, self.eps)
        return self.lm_head(last)
