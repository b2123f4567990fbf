"""The built-in demo model: a small Llama with random weights and a byte-level tokenizer, made in code.

Nothing is downloaded. Weights are drawn per parameter from a generator seeded
by (seed, parameter name), not from transformers' own init, so the same seed
gives the same bytes on every machine and transformers version.
Sized so a 1,536-token prefill takes about a second on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cache_store import CacheConfig, KVShape

DEMO_SEED = 20260101
SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258


def demo_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256 + len(SPECIALS),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def demo_block_bytes(block_size: int = CacheConfig.block_size, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one KV block of the demo model (by default at the cache's default block size, in
    float32 as on CPU): what tests and benchmarks size its caches in."""
    c = demo_config()
    return KVShape(c.num_hidden_layers, c.num_key_value_heads, block_size, c.head_dim, dtype).block_bytes


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what ByteLevel pre-tokenizes to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0..255) plus three special tokens; adds none by default."""
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[2]
    )


def _seeded(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@torch.no_grad()
def fill_random_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic weights: norms 1, biases 0, matrices N(0, std) from a per-name generator."""
    for name, param in model.named_parameters():
        if param.ndim == 1:
            param.fill_(1.0 if "norm" in name else 0.0)
        else:
            values = torch.randn(param.shape, generator=_seeded(seed, name), dtype=torch.float32) * std
            param.copy_(values.to(param.dtype))


@torch.no_grad()
def _favour_printable_text(model: LlamaForCausalLM) -> None:
    """Scale the output rows of printable bytes, letters and space up, so greedy output is varied,
    word-like text rather than one repeated byte: a wrong-KV bug then changes visible tokens."""
    head = model.lm_head.weight
    head[32:127] *= 1.5
    head[ord("a") : ord("z") + 1] *= 1.8
    head[ord(" ")] *= 2.5


def demo_model(seed: int = DEMO_SEED, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    model = LlamaForCausalLM(demo_config())
    fill_random_weights(model, seed, std=0.08)
    _favour_printable_text(model)
    return model.to(dtype).eval()


def write_demo_model(directory: str | Path, seed: int = DEMO_SEED) -> Path:
    """Write the demo model and tokenizer in Hugging Face format (loadable with AutoModelForCausalLM)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    demo_model(seed).save_pretrained(out)
    demo_tokenizer().save_pretrained(out)
    return out
