"""Prompt files for `python -m infir2_jax.generate`: JSONL, one prompt per line, as
`input_ids` (token ids, used as given), `prompt` (text) or `messages` (a chat, rendered with
the chat template and the assistant's generation prompt). Every line is checked before
anything runs; an error names the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from infir2_jax.data.chat import check_turns
from infir2_jax.data.records import DataError

FIELDS = ("input_ids", "prompt", "messages")


def read_prompts(
    path: str | Path, tokenizer, *, chat: bool, vocab_size: int, max_len: int
) -> list[list[int]]:
    """Token ids per prompt, in file order (blank lines skipped). `chat`: a `prompt` is one
    user turn of a chat. A prompt must leave room for one new token in `max_len`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"--prompts {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"--prompts {path}: not UTF-8 text (byte {e.start})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        ids = _prompt_ids(line, tokenizer, chat, where)
        if not ids:
            raise DataError(f"{where}: the prompt is empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise DataError(
                f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
            )
        if len(ids) >= max_len:
            raise DataError(
                f"{where}: the prompt has {len(ids)} tokens; the KV cache holds --max-len="
                f"{max_len} (prompt plus at least one new token)"
            )
        prompts.append(ids)
    if not prompts:
        raise DataError(f"--prompts {path}: no prompts")
    return prompts


def _prompt_ids(line: str, tokenizer, chat: bool, where: str) -> list[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with one of {list(FIELDS)}")
    present = [f for f in FIELDS if f in record]
    if len(present) != 1:
        raise DataError(f"{where}: expected exactly one of {list(FIELDS)}, found {present}")
    (field,) = present
    value = record[field]
    if field == "input_ids":
        if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        ):
            raise DataError(f"{where}: 'input_ids' must be a list of integers")
        return value
    if tokenizer is None:
        raise DataError(
            f"{where}: a '{field}' prompt needs a tokenizer; the model directory has none "
            "(pass --tokenizer DIR, or give 'input_ids')"
        )
    if field == "prompt":
        if not isinstance(value, str):
            raise DataError(f"{where}: 'prompt' must be a string")
        if not chat:
            return tokenizer(value, add_special_tokens=False)["input_ids"]
        value = [{"role": "user", "content": value}]
    return chat_prompt_ids(value, tokenizer, where)


def chat_prompt_ids(messages, tokenizer, where: str) -> list[int]:
    """A chat's token ids with the assistant's generation prompt (DataError naming `where`)."""
    check_turns(messages, where)
    if not tokenizer.chat_template:
        raise DataError(f"{where}: the tokenizer has no chat template (pass --chat-template)")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: the chat template failed: {e}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]
