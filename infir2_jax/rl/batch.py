"""Rollouts -> packed training rows for the policy loss.

Each sample (prompt + response) becomes one packed document: inputs are its tokens but the
last, labels the next tokens, positions restart at 0, and the loss mask covers the labels
that are response tokens (the prompt is context only). Per label it also carries the
sample's advantage, the rollout engine's log-probability of that token, and the sample's
index (for per-sample loss aggregation). Samples are packed first-fit by decreasing length;
a sample is never split across rows, so micro-batches (which split rows) add up exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rollout:
    prompt: Sequence[int]
    response: Sequence[int]  # sampled ids (a final stop token included)
    logprobs: Sequence[float]  # the rollout engine's, one per response token
    advantage: float


def pack_rollouts(
    rollouts: Sequence[Rollout], seq_len: int, *, row_multiple: int = 1
) -> dict[str, np.ndarray]:
    """Rows of `seq_len` tokens holding every rollout, their count rounded up to a multiple of
    `row_multiple` (data-parallel devices × micro-batches) with empty rows. Keys: input_ids,
    labels, positions, segment_ids (0: padding), loss_mask, advantages, rollout_logprobs,
    sample_ids (the rollout's index; -1 on padding) — all [rows, seq_len]."""
    lengths = []
    for i, r in enumerate(rollouts):
        if len(r.response) == 0 or len(r.prompt) == 0:
            raise ValueError(f"rollout {i}: empty prompt or response")
        if len(r.logprobs) != len(r.response):
            raise ValueError(
                f"rollout {i}: {len(r.logprobs)} logprobs for {len(r.response)} response tokens"
            )
        length = len(r.prompt) + len(r.response) - 1  # inputs: every token but the last
        if length > seq_len:
            raise ValueError(
                f"rollout {i}: prompt {len(r.prompt)} + response {len(r.response)} tokens "
                f"exceed a training row of seq_len + 1 = {seq_len + 1}"
            )
        lengths.append(length)
    rows: list[list[int]] = []  # rollout indices per row
    free: list[int] = []
    for i in sorted(range(len(rollouts)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(seq_len)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    count = max(1, -(-len(rows) // row_multiple) * row_multiple)
    shape = (count, seq_len)
    batch = {
        "input_ids": np.zeros(shape, np.int32),
        "labels": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "advantages": np.zeros(shape, np.float32),
        "rollout_logprobs": np.zeros(shape, np.float32),
        "sample_ids": np.full(shape, -1, np.int32),
    }
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(sorted(members), start=1):
            rollout = rollouts[i]
            tokens = np.asarray([*rollout.prompt, *rollout.response], np.int32)
            n, p = len(tokens) - 1, len(rollout.prompt)
            span = slice(start, start + n)
            batch["input_ids"][r, span] = tokens[:-1]
            batch["labels"][r, span] = tokens[1:]
            batch["positions"][r, span] = np.arange(n)
            batch["segment_ids"][r, span] = segment
            batch["sample_ids"][r, span] = i
            response = slice(start + p - 1, start + n)  # labels that are response tokens
            batch["loss_mask"][r, response] = 1.0
            batch["advantages"][r, response] = rollout.advantage
            batch["rollout_logprobs"][r, response] = rollout.logprobs
            start += n
    return batch
