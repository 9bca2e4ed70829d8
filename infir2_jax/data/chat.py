"""Chat conversations -> tokens and an assistant-only loss mask, via the tokenizer's template.

The mask is found in text space, then mapped to tokens with the fast tokenizer's offsets:
for assistant turn i, the rendered conversation up to turn i with the generation prompt
(`...<|im_start|>assistant\\n`) is a prefix of the full text, so its length is where the turn's
content starts; the turn ends at its end-of-turn marker (`<|im_end|>`, included; the newline
the template puts after it is not). A token is in the loss if it starts inside such a span.
This works for any template that renders conversations prefix-stably (Qwen2.5's does); one
that rewrites earlier turns (Qwen3's strips old reasoning) is rejected with a clear error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infir2_jax.data.records import DataError

ROLES = ("system", "user", "assistant", "tool")


def check_turns(messages: Any, where: str) -> None:
    """A non-empty list of {"role", "content"} turns (generation prompts, SFT samples)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} needs a role in {list(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: message {i} ({turn['role']}) has no string 'content'")


def _check_messages(messages: Any, where: str) -> None:
    check_turns(messages, where)
    if not any(turn["role"] == "assistant" for turn in messages):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")


def assistant_spans(tokenizer, messages: list[dict], end_of_turn: str, where: str):
    """(rendered text, [(start, end) character span of each assistant turn])."""

    def render(turns, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    try:
        text = render(messages)
    except Exception as e:  # jinja raises many types; the message matters
        raise DataError(f"{where}: the chat template failed: {e}") from None
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(render(messages[:i], generation_prompt=True))
        upto = render(messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(text[:start]):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix-stably "
                "(earlier turns change when later ones are added); set data.chat_template to "
                "a template that does, e.g. Qwen2.5's"
            )
        end = upto.rfind(end_of_turn, start)
        if end < 0:
            raise DataError(
                f"{where}: assistant turn {i} does not end with data.end_of_turn={end_of_turn!r}"
            )
        spans.append((start, end + len(end_of_turn)))
    return text, spans


def assistant_token_mask(
    tokenizer, messages: Any, end_of_turn: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and a 0/1 mask of the assistant tokens."""
    _check_messages(messages, where)
    text, spans = assistant_spans(tokenizer, messages, end_of_turn, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in encoded["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), np.int32)
    for lo, hi in spans:
        mask[(starts >= lo) & (starts < hi)] = 1
    return ids, mask
