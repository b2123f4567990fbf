"""The model-dependent checks of a tokenized prompt, shared by the router, the engine and the HTTP
ingress: one rule for the context, one message for a prompt without tokens."""

from worker.request import NO_TOKENS, ErrorKind, fits_context, prompt_ids_problem


def test_the_context_rule_counts_the_prompt_and_every_token_it_may_generate():
    assert fits_context(90, 10, 100) and not fits_context(91, 10, 100)
    assert prompt_ids_problem([1] * 90, 10, 50, 100) is None
    over = prompt_ids_problem([1] * 91, 10, 50, 100)
    assert over.kind is ErrorKind.CONTEXT_EXCEEDED and "101 exceeds the model context of 100" in over.message


def test_no_tokens_and_unknown_ids_are_bad_requests_that_say_what_to_send():
    empty = prompt_ids_problem([], 10, 50, 100)
    assert empty.kind is ErrorKind.BAD_REQUEST and empty.message == NO_TOKENS
    bad = prompt_ids_problem([3, 50, 7], 1, 50, 100)
    assert bad.kind is ErrorKind.BAD_REQUEST and "[50]" in bad.message and "below 50" in bad.message
