"""Records -> training examples: next-token inputs, labels and a loss mask per token.

Every example is a dict of equal-length 1-D arrays, the unit the packers work on:
  input_ids, labels  tokens t[:-1] and t[1:]
  loss_mask          1 where the label counts (CPT: all; SFT: assistant content + end of turn)
  doc_ids            source index + 1 on every token (0 marks padding after packing), so a
                     batch tells which samples it holds
  overlong           1 on the first token of a truncated sample, 2 for a dropped one (see
                     `SftExamples`): the pipeline counts them without side channels
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from infir2_jax.data.chat import assistant_token_mask
from infir2_jax.data.records import DataError, Record
from infir2_jax.data.tokenizer import LazyTokenizer

Example = dict[str, np.ndarray]
FEATURES = ("input_ids", "labels", "loss_mask", "doc_ids", "overlong")
TRUNCATED, DROPPED = 1, 2


def make_example(tokens: np.ndarray, mask: np.ndarray, index: int, overlong: int = 0) -> Example:
    n = len(tokens) - 1
    flags = np.zeros(n, np.int32)
    flags[0] = overlong
    return {
        "input_ids": tokens[:-1].astype(np.int32),
        "labels": tokens[1:].astype(np.int32),
        "loss_mask": mask[1:].astype(np.int32),  # the mask of the token each label predicts
        "doc_ids": np.full(n, index + 1, np.int32),
        "overlong": flags,
    }


def _token_list(value: Any, where: str, field: str) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
        raise DataError(f"{where}: field {field!r} is not a list of token ids")
    return np.asarray(value, np.int32)


class CptExamples:
    """Pre-training documents: text (tokenized, EOS appended) or token ids used as given."""

    def __init__(self, tokenizer: LazyTokenizer, text_field: str, tokens_field: str | None):
        self.tokenizer, self.text_field, self.tokens_field = tokenizer, text_field, tokens_field

    def tokens(self, record: Record) -> np.ndarray:
        value = record.value
        if isinstance(value, np.ndarray):
            return value
        if self.tokens_field is not None:
            return _token_list(value.get(self.tokens_field), record.where, self.tokens_field)
        text = value[self.text_field]
        if not isinstance(text, str):
            raise DataError(f"{record.where}: field {self.text_field!r} is not a string")
        tokenizer = self.tokenizer.get()
        if tokenizer.eos_token_id is None:
            raise DataError(f"data.tokenizer: {self.tokenizer.path}: the tokenizer has no EOS")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray([*ids, tokenizer.eos_token_id], np.int32)

    def __call__(self, index: int, record: Record) -> Example | None:
        tokens = self.tokens(record)
        if len(tokens) < 2:  # nothing to predict; grain drops None
            return None
        return make_example(tokens, np.ones_like(tokens), index)


class SftExamples:
    """Chat samples, loss on assistant turns only. A sample longer than `seq_len` + 1 tokens is
    truncated, or dropped: a dropped sample leaves a one-token placeholder with no loss (so the
    drop is counted in the batch it would have been in) instead of vanishing silently."""

    def __init__(
        self,
        tokenizer: LazyTokenizer,
        messages_field: str,
        end_of_turn: str,
        seq_len: int,
        overlong: Literal["truncate", "drop"],
    ):
        self.tokenizer, self.messages_field, self.end_of_turn = (
            tokenizer,
            messages_field,
            end_of_turn,
        )
        self.seq_len, self.overlong = seq_len, overlong

    def tokens_and_mask(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
        value = record.value
        if isinstance(value, np.ndarray):  # prepared: [2, length]
            return value[0], value[1]
        return assistant_token_mask(
            self.tokenizer.get(), value[self.messages_field], self.end_of_turn, record.where
        )

    def __call__(self, index: int, record: Record) -> Example | None:
        tokens, mask = self.tokens_and_mask(record)
        if len(tokens) < 2:
            return None
        if len(tokens) - 1 <= self.seq_len:
            return make_example(tokens, mask, index)
        if self.overlong == "truncate":
            keep = self.seq_len + 1
            return make_example(tokens[:keep], mask[:keep], index, TRUNCATED)
        placeholder = np.zeros(2, np.int32)  # one input token, no loss
        return make_example(placeholder, placeholder, index, DROPPED)
