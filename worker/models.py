"""Loading a causal LM, deciding whether the cache can serve it exactly, and naming it.

The cache stores, per block, every layer's full key/value for every token.
That is exact only for models whose attention reads the whole prefix through
a plain per-layer KV cache. Sliding-window, chunked, hybrid / linear
attention, KV sharing and encoder-decoder models are refused with the reason.

The fingerprint names the KV a model produces: weights, architecture config,
dtype, tokenizer and block size. It is the first field of every block hash's
namespace, so two models never share a block.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

from worker import smollm2
from worker.demo_model import DEMO_SEED, demo_model, demo_tokenizer

FINGERPRINT_VERSION = "prefixcache.fingerprint.v1"
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation_autoset",
}


class ModelError(ValueError):
    """The model cannot be loaded or served; the message says why and what to do."""


class UnsupportedModel(ModelError):
    """The model loads, but the prefix cache could not serve it exactly."""


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: object
    layout: KVLayout
    max_context: int
    vocab_size: int
    eos_ids: frozenset[int]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def check_supported(config) -> None:
    """Refuse configs whose attention the block cache cannot reproduce exactly."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel("encoder-decoder models are not supported: only decoder-only causal LMs")
    text = config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(text)
    bad = sorted({t for t in layer_types if t != "full_attention"})
    if bad:
        n_bad = sum(t != "full_attention" for t in layer_types)
        kinds = ", ".join(_KIND_NAMES.get(t, t) for t in bad)
        hint = ""
        if "sliding_attention" in bad:
            hint = (
                "; sliding-window layers keep only the last window of KV, so a cached prefix would not "
                "match a fresh prefill. If the model was trained without the window, load it with the "
                "window off (e.g. use_sliding_window=false / sliding_window=null in config.json)"
            )
        raise UnsupportedModel(
            f"{type(config).__name__}: {n_bad} of {len(layer_types)} layers use {kinds}, not full attention; "
            f"prefixcache serves only full-attention models exactly{hint}"
        )


_KIND_NAMES = {
    "sliding_attention": "sliding-window attention",
    "chunked_attention": "chunked attention",
    "linear_attention": "recurrent state (linear attention / state space)",
    "conv": "convolution state",
    "hybrid": "hybrid attention + recurrent state",
    "hybrid_sliding": "hybrid sliding attention + recurrent state",
    "dummy": "shared / no KV (KV sharing or attention-free layers)",
}


def cache_kwargs(model: PreTrainedModel, cache) -> dict:
    """`cache` as the keyword the model's forward takes: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns, and goes in 5.40); older 5.x take only the
    old name and drop the new one into **kwargs, unused."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def probe_layout(model: PreTrainedModel) -> KVLayout:
    """Run two tokens through the model and read the KV it caches: every layer must be a plain,
    uniform full-attention layer, or the cache could not be assembled exactly."""
    cache = DynamicCache(config=model.config)
    ids = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    shapes = set()
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise UnsupportedModel(
                f"layer {i} uses {type(layer).__name__}; only full-attention KV layers are supported"
            )
        if layer.keys is None or layer.keys.shape != layer.values.shape or layer.keys.shape[2] != 2:
            raise UnsupportedModel(f"layer {i} caches KV of an unexpected shape; the block cache cannot hold it")
        shapes.add(tuple(layer.keys.shape[1::2]))
    if len(shapes) != 1:
        raise UnsupportedModel(
            f"layers cache KV of different shapes {sorted(shapes)}; only uniform layers are supported"
        )
    ((heads, dim),) = shapes
    return KVLayout(len(cache.layers), heads, dim)


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """'demo' (built in code), 'smollm2' (converted once from its GGUF) or a local Hugging Face directory."""
    if name == "demo":
        model, tokenizer = demo_model(DEMO_SEED, dtype), demo_tokenizer()
    else:
        path = model_path(name)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read the model config in {path}: {e}") from None
        check_supported(config)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the model in {path}: {e}") from None
        model = model.eval()
    check_supported(model.config)
    model = model.to(device)
    layout = probe_layout(model)
    text = model.config.get_text_config(decoder=True)
    max_context = int(getattr(text, "max_position_embeddings", 0) or getattr(text, "n_positions", 0) or 2048)
    return LoadedModel(name, model, tokenizer, layout, max_context, int(text.vocab_size), _eos_ids(model, tokenizer))


def load_tokenizer(name: str):
    """The tokenizer alone (the router needs no weights)."""
    if name == "demo":
        return demo_tokenizer()
    return AutoTokenizer.from_pretrained(model_path(name))


def model_path(name: str) -> Path:
    """The Hugging Face directory behind a model name: 'smollm2' (converted on first use) or a path."""
    if name == smollm2.NAME:
        try:
            return smollm2.model_dir()
        except smollm2.MissingPackage as e:
            raise ModelError(str(e)) from None
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"unknown model {name!r}: not 'demo', not 'smollm2' and not a directory with a config.json; "
            "pass model='demo', model='smollm2' or the path of a local Hugging Face model directory"
        )
    return path


def _eos_ids(model: PreTrainedModel, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def fingerprint(model: PreTrainedModel, tokenizer, block_size: int) -> str:
    """Hex name of the KV this model produces: weights, config, dtype, tokenizer, block size.

    Hashes every weight byte (about 1 s per GB); identical weights loaded from
    anywhere (built in code or read from a directory) give the same name.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(FINGERPRINT_VERSION.encode())
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"block_size={block_size}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(_tokenizer_identity(tokenizer))
    return h.hexdigest()


def _tokenizer_identity(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str().encode()
    return json.dumps(sorted(tokenizer.get_vocab().items())).encode()
