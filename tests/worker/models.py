"""Tiny random-weight model directories of several architectures (built in code, saved in HF format)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

from worker.demo_model import BOS_ID, EOS_ID, PAD_ID, demo_tokenizer, fill_random_weights

SMALL = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

SUPPORTED = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL, use_sliding_window=False),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
    "gemma": lambda: GemmaConfig(**SMALL, head_dim=16),
}

UNSUPPORTED = {
    "qwen2-sliding": lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=32, max_window_layers=0),
    "mistral-sliding": lambda: MistralConfig(**SMALL, sliding_window=32),
    "gemma2-hybrid": lambda: Gemma2Config(**SMALL, head_dim=16),
}


def write_tiny(directory: Path, config, seed: int = 7) -> Path:
    model = AutoModelForCausalLM.from_config(config)
    fill_random_weights(model, seed, std=0.3)
    model.to(torch.float32).save_pretrained(directory)
    demo_tokenizer().save_pretrained(directory)
    return directory
