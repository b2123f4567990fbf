"""Invariant 6 inside a step: nothing one request sends can change or fail another request's answer,
whatever shares its batch. Extreme but valid parameters are numerically safe; a failure that is one
request's own (its sampling, its sink, its forward) fails that request only, with a server error."""

from __future__ import annotations

import pytest

from worker.request import ErrorKind, Request

from .reference import rand_ids, reference
from .test_batching import assert_nothing_held, engine_for

N_NEW = 12
EXTREMES = [
    {"temperature": 1e-40},  # dividing by it overflows float32: greedy below the threshold
    {"temperature": 1e-6, "seed": 1},
    {"temperature": 2.0, "seed": 2**63 - 1},
    {"temperature": 1e300, "top_k": 1, "seed": 0},
    {"temperature": 1.0, "top_p": 1e-300, "seed": 7},
    {"temperature": 0.7, "top_k": 10**9, "top_p": 0.999999, "seed": 3},
    {"stop": tuple(f"stop-{i}-" + "x" * 200 for i in range(16))},
    {"min_tokens": N_NEW, "ignore_eos": True},
]


def test_extreme_parameters_beside_normal_requests_change_nothing(tiny_dirs):
    engine = engine_for("demo", tiny_dirs)
    normal = [rand_ids(30 + 7 * i, seed=500 + i) for i in range(6)]
    seqs = []
    for i, p in enumerate(normal):
        seqs.append(("normal", p, engine.submit(Request(p, max_new_tokens=N_NEW))))
        for params in EXTREMES[i::6]:
            extreme = rand_ids(25, seed=600 + i)
            seqs.append(("extreme", params, engine.submit(Request(extreme, max_new_tokens=N_NEW, **params))))
    for what, p, seq in seqs:
        r = engine.wait(seq)
        assert r.ok, (what, p, r.error)
        if what == "normal":
            assert r.token_ids == reference(engine, p, N_NEW)[0]
        else:
            assert len(r.token_ids) >= 1
    assert_nothing_held(engine)


def test_a_temperature_too_small_to_divide_by_is_greedy(tiny_dirs):
    engine = engine_for("demo", tiny_dirs)
    p = rand_ids(40, seed=9)
    [tiny] = engine.generate([p], max_new_tokens=N_NEW, temperature=1e-40)
    assert tiny.ok and tiny.token_ids == reference(engine, p, N_NEW)[0]


def test_a_failing_sink_fails_only_its_own_request(tiny_dirs):
    engine = engine_for("demo", tiny_dirs)
    prompts = [rand_ids(30, seed=10 + i) for i in range(3)]

    def broken(chunk):
        if chunk.result is None:
            raise RuntimeError("the caller's connection broke")

    seqs = [engine.submit(Request(p, max_new_tokens=N_NEW)) for p in prompts]
    bad = engine.submit(Request(rand_ids(30, seed=99), max_new_tokens=N_NEW), sink=broken)
    results = [engine.wait(s) for s in seqs]
    failed = engine.wait(bad)
    assert not failed.ok and failed.error_kind is ErrorKind.INTERNAL and "connection broke" in failed.error
    for p, r in zip(prompts, results):
        assert r.ok and r.token_ids == reference(engine, p, N_NEW)[0]
    assert_nothing_held(engine)


class PoisonToken:
    """Makes the real model's forward raise whenever `token` is among its inputs (a device fault
    that only one request's data triggers), through a hook on the embedding layer."""

    def __init__(self, engine, token: int):
        def hook(module, inputs):
            if (inputs[0] == token).any():
                raise RuntimeError(f"device fault on token {token}")

        self._h = engine.model.get_input_embeddings().register_forward_pre_hook(hook)

    def close(self):
        self._h.remove()


def test_a_forward_that_fails_for_one_request_fails_only_that_one(tiny_dirs):
    engine = engine_for("demo", tiny_dirs)
    prompts = [[t % 255 for t in rand_ids(40, seed=20 + i)] for i in range(4)]  # no 255 in these
    expected = [reference(engine, p, N_NEW)[0] for p in prompts]
    poison = PoisonToken(engine, 255)
    try:
        seqs = [engine.submit(Request(p, max_new_tokens=N_NEW)) for p in prompts]
        bad = engine.submit(Request(rand_ids(30, seed=3) + [255], max_new_tokens=N_NEW))
        failed = engine.wait(bad)
        results = [engine.wait(s) for s in seqs]
    finally:
        poison.close()
    assert not failed.ok and failed.error_kind is ErrorKind.INTERNAL and "forward pass failed" in failed.error
    for exp, r in zip(expected, results):
        assert r.ok and r.token_ids == exp, r.error
    assert_nothing_held(engine)
    assert engine.generate([prompts[0]], max_new_tokens=N_NEW)[0].token_ids == expected[0]  # still serving


@pytest.mark.parametrize("n_new", [4, 16])
def test_ignore_eos_and_min_tokens_fix_the_output_length(n_new):
    from worker.engine import Engine

    from .test_exactness_smollm2 import GEOGRAPHY, chat_ids

    engine = Engine.from_pretrained("smollm2", device="cpu", dtype="float32", device_cache_gb=0.05, host_cache_gb=0)
    try:
        ids = chat_ids(engine.tokenizer, GEOGRAPHY, "What is the capital of France?")
        [plain] = engine.generate([ids], max_new_tokens=32)
        assert plain.finish_reason == "eos" and len(plain.token_ids) < 16  # "The capital of France is Paris."
        [ignored] = engine.generate([ids], max_new_tokens=plain_len(plain) + n_new, ignore_eos=True)
        assert ignored.finish_reason == "length" and len(ignored.token_ids) == plain_len(plain) + n_new
        assert ignored.token_ids[: plain_len(plain)] == plain.token_ids  # the same answer, then more
        want = plain_len(plain) + n_new
        [forced] = engine.generate([ids], max_new_tokens=want + 8, min_tokens=want)
        assert len(forced.token_ids) >= want and forced.token_ids[: plain_len(plain) - 1] == plain.token_ids[:-1]
        eos = engine.loaded.eos_ids
        assert not eos & set(forced.token_ids[:want])  # no end of sequence before min_tokens
    finally:
        engine.close()


def plain_len(result) -> int:
    return len(result.token_ids)
