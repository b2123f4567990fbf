import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from worker.demo_model import demo_model, demo_tokenizer, write_demo_model
from worker.engine import Engine
from worker.models import ModelError, UnsupportedModel, cache_kwargs, fingerprint, load_model

from .models import UNSUPPORTED


def test_demo_model_written_in_hf_format_loads_identically(tmp_path):
    write_demo_model(tmp_path / "demo")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo")
    tok = AutoTokenizer.from_pretrained(tmp_path / "demo")
    ref, ref_tok = demo_model(), demo_tokenizer()
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    text = "Hello, wörld!"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"] == list(text.encode())
    assert fingerprint(model, tok, 16) == fingerprint(ref, ref_tok, 16)


def test_demo_model_is_deterministic_and_seeded():
    a, b, c = demo_model(), demo_model(), demo_model(seed=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_the_cache_keyword_is_the_one_this_transformers_reads():
    """Under the wrong name the forward fills nothing (before 5.24) or warns that the name goes
    (5.24 and later); the GPU image runs 5.17, this machine a newer one."""
    model = demo_model()
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids=torch.zeros((1, 3), dtype=torch.long), use_cache=True, **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 3


def test_fingerprint_covers_weights_dtype_and_block_size():
    m, tok = demo_model(), demo_tokenizer()
    base = fingerprint(m, tok, 16)
    assert fingerprint(m, tok, 32) != base
    assert fingerprint(demo_model(seed=2), tok, 16) != base
    assert fingerprint(m.to(torch.bfloat16), tok, 16) != base


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_models_the_cache_cannot_serve_exactly_are_refused(tiny_dirs, name):
    with pytest.raises(UnsupportedModel, match="not full attention"):
        Engine.from_pretrained(str(tiny_dirs[name]), device="cpu")


def test_sliding_window_message_says_what_to_change(tiny_dirs):
    with pytest.raises(UnsupportedModel, match="sliding_window=null"):
        load_model(str(tiny_dirs["mistral-sliding"]), torch.device("cpu"), torch.float32)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="unknown model .* local Hugging Face model directory"):
        Engine.from_pretrained(str(tmp_path / "no-such-model"), device="cpu")


def test_bad_device_and_dtype_are_clear_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            Engine.from_pretrained("demo", device="cuda")
    with pytest.raises(ModelError, match="dtype must be one of"):
        Engine.from_pretrained("demo", device="cpu", dtype="int3")
