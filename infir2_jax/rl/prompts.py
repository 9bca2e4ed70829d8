"""RL prompt sets: prompt token ids with the label their responses are graded against.

`prompts` files are JSONL or Parquet, one prompt per record, in DAPO-Math-17k's layout
(`prompt`: chat messages, `reward_model.ground_truth`: the label) or plain
`{"question", "answer"}` (the question becomes one user turn, after an optional system prompt;
a GSM8K-style worked answer ending `#### N` is labelled N). Prompts are rendered with the chat
template and its assistant generation prompt. `arithmetic` is tiny_rl's built-in task.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from infir2_jax.data import synthetic
from infir2_jax.data.bundled import BUNDLED, bundled_path
from infir2_jax.data.chat import check_turns
from infir2_jax.data.records import DataError


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    label: str


@dataclasses.dataclass
class PromptSet:
    prompts: list[Prompt]
    duplicates: int = 0  # records dropped as repeats
    too_long: int = 0  # records dropped for max_prompt_tokens

    def __len__(self) -> int:
        return len(self.prompts)


def arithmetic_prompts() -> PromptSet:
    """The multiplication facts `a * b =` (a, b < 13) of tiny_cpt's corpus, byte tokens; the
    label is the product. A tiny model trained by tiny_cpt knows some of them."""
    prompts = [
        Prompt(tuple(synthetic.encode(f"{a} * {b} =").tolist()), str(a * b))
        for a in range(13)
        for b in range(13)
    ]
    return PromptSet(prompts)


def _records(path: Path):
    """(where, record) for every record of a JSONL or Parquet file."""
    if not path.is_file():
        raise DataError(f"rl.prompts: {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", record
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def _messages_and_label(
    record: Any, where: str, template: str, system_prompt: str | None
) -> tuple[list[dict], str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object")
    if "prompt" in record and isinstance(record.get("reward_model"), dict):
        messages = record["prompt"]
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        label = record["reward_model"].get("ground_truth")
    elif "question" in record and "answer" in record:
        content = template.replace("{question}", str(record["question"]))
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        label = record["answer"]
        if isinstance(label, str) and "####" in label:  # GSM8K: the work, then `#### N`
            label = label.rpartition("####")[2].strip()
    else:
        raise DataError(
            f"{where}: expected DAPO's layout (prompt, reward_model.ground_truth) or "
            f"question/answer; found keys {sorted(record)}"
        )
    if label is None or (isinstance(label, str) and not label.strip()):
        raise DataError(f"{where}: empty label")
    check_turns(messages, where)
    return messages, str(label)


def load_prompts(
    path: str | Path,
    tokenizer,
    *,
    dedupe: bool,
    max_tokens: int,
    question_template: str = "{question}",
    system_prompt: str | None = None,
) -> PromptSet:
    """Every prompt of the file (or bundled set, e.g. "aime24"), rendered and tokenized (see
    the module docstring); `question_template` makes a plain question a user turn, after
    `system_prompt` when one is given."""
    if tokenizer is None:
        raise DataError("rl.tokenizer: prompt files need a tokenizer (a directory or `qwen`)")
    if not tokenizer.chat_template:
        raise DataError("rl.chat_template: the tokenizer has no chat template; set one")
    out, seen, duplicates, too_long = [], set(), 0, 0
    path = Path(path)
    if not path.is_file() and str(path) in BUNDLED:
        path = bundled_path(str(path))
    for where, record in _records(path):
        messages, label = _messages_and_label(record, where, question_template, system_prompt)
        key = (json.dumps(messages, sort_keys=True), label)
        if dedupe and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            too_long += 1
            continue
        out.append(Prompt(tuple(ids), label))
    if not out:
        raise DataError(f"rl.prompts: {path}: no usable prompts")
    return PromptSet(out, duplicates, too_long)


class PromptOrder:
    """Prompts in a seeded shuffle, reshuffled each epoch; the position is one integer (kept
    in checkpoints), so a resumed run draws exactly the prompts it would have."""

    def __init__(self, size: int, seed: int, position: int = 0):
        self.size, self.seed, self.position = size, seed, position
        self._epoch, self._order = -1, np.arange(0)

    def take(self, count: int) -> list[int]:
        out = []
        for k in range(self.position, self.position + count):
            epoch, i = divmod(k, self.size)
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            out.append(int(self._order[i]))
        self.position += count
        return out
