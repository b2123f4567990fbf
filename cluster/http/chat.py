"""Chat messages -> prompt token ids, through the model's own chat template.

Rendered with `add_generation_prompt=True` and tokenized without adding special tokens (the template
already has them), as vLLM and SGLang do; the router receives token ids, so a tokenizer that adds a
BOS by default cannot add a second one. A model without a chat template (the random-weights `demo`
model) gets ChatML, the format SmolLM2, Qwen and many others use, so the fast tests can chat too.
"""

from __future__ import annotations

from cluster.http.errors import bad_request

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else CHATML
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises its own types: a template that refuses these messages
        raise bad_request(f"the model's chat template refused these messages: {e}", param="messages") from None


def chat_ids(
    tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True, add_special_tokens: bool = False
) -> list[int]:
    """A chat's prompt; the defaults are what /v1/chat/completions runs (/tokenize can change them)."""
    text = render(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def text_ids(tokenizer, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
    """A completion prompt, tokenized as the router would (adding what the tokenizer adds by default)."""
    return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
