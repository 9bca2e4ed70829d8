"""The two kinds of training data, resolved once from `data.kind` into an object that carries
everything that differs between them: which record field holds a sample, how records become
examples and examples rows, the layout of a prepared record, and the per-batch counters a run
reports and checkpoints.

  cpt  documents (text tokenized with EOS appended, or token ids), joined and cut into rows;
       the loss on every token
  sft  chat samples, the loss on assistant turns, whole samples packed first-fit into rows;
       over-long samples truncated or dropped and counted
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import grain
import numpy as np

from infir2_jax.config import DataConfig
from infir2_jax.data.examples import (
    DROPPED,
    FEATURES,
    TRUNCATED,
    CptExamples,
    Example,
    SftExamples,
)
from infir2_jax.data.records import Record
from infir2_jax.data.tokenizer import LazyTokenizer

# Per-batch counts of over-long SFT samples: summed over the run, logged with its metrics and
# kept in every checkpoint's meta (zero for CPT, so checkpoints of either kind read alike).
OVERLONG_COUNTERS = ("truncated_samples", "dropped_samples")


class DataKind(abc.ABC):
    """What a run does with data of one kind; `data_kind(name)` returns the instance."""

    name: str
    chat: bool  # records are conversations (not documents)
    counters: tuple[str, ...] = ()  # of OVERLONG_COUNTERS: what `count` reports

    @abc.abstractmethod
    def field(self, cfg: DataConfig) -> str:
        """The record field that holds a sample."""

    @abc.abstractmethod
    def needs_tokenizer(self, cfg: DataConfig) -> bool:
        """Whether raw records are text to tokenize (not token ids already)."""

    @abc.abstractmethod
    def examples(
        self, cfg: DataConfig, tokenizer: LazyTokenizer, seq_len: int
    ) -> Callable[[int, Record], Example | None]:
        """(source index, record) -> a training example, or None for nothing to learn."""

    @abc.abstractmethod
    def pack(self, ds: grain.IterDataset, cfg: DataConfig, seq_len: int, seed: int):
        """Examples -> rows of `seq_len` tokens (segment ids and positions per sample)."""

    @abc.abstractmethod
    def encode(self, cfg: DataConfig, tokenizer: LazyTokenizer) -> Callable[[Record], np.ndarray]:
        """A raw record -> the int32 array `python -m infir2_jax.prepare` stores for it."""

    def prepared(self, array: np.ndarray) -> np.ndarray:
        """A stored (flat) prepared record -> the record value the examples read."""
        return array

    def tally(self) -> Tally:
        """Counts prepared records for `prepared.json`."""
        return Tally()

    def count(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        """This host batch's contribution to `counters`."""
        return {}


class _Cpt(DataKind):
    name, chat = "cpt", False

    def field(self, cfg):
        return cfg.tokens_field or cfg.text_field

    def needs_tokenizer(self, cfg):
        return cfg.tokens_field is None

    def examples(self, cfg, tokenizer, seq_len):
        return CptExamples(tokenizer, cfg.text_field, cfg.tokens_field)

    def pack(self, ds, cfg, seq_len, seed):
        lengths = _lengths(seq_len)
        return _JsonState(grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths))

    def encode(self, cfg, tokenizer):
        return CptExamples(tokenizer, cfg.text_field, cfg.tokens_field).tokens


class _Sft(DataKind):
    name, chat = "sft", True
    counters = OVERLONG_COUNTERS

    def field(self, cfg):
        return cfg.messages_field

    def needs_tokenizer(self, cfg):
        return True

    def examples(self, cfg, tokenizer, seq_len):
        return SftExamples(tokenizer, cfg.messages_field, cfg.end_of_turn, seq_len, cfg.overlong)

    def pack(self, ds, cfg, seq_len, seed):
        return grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=_lengths(seq_len), num_packing_bins=cfg.pack_bins, seed=seed
        )

    def encode(self, cfg, tokenizer):
        # Kept whole: truncating or dropping depends on train.seq_len, applied when training.
        examples = SftExamples(tokenizer, cfg.messages_field, cfg.end_of_turn, 0, "truncate")
        return lambda record: np.stack(examples.tokens_and_mask(record))

    def prepared(self, array):
        return array.reshape(2, -1)  # [tokens, assistant loss mask]

    def tally(self):
        return _SftTally()

    def count(self, batch):
        return {
            "truncated_samples": int(np.sum(batch["overlong"] == TRUNCATED)),
            "dropped_samples": int(np.sum(batch["overlong"] == DROPPED)),
        }


class _JsonState(grain.IterDataset):
    """Concat-then-split packing whose state survives JSON (as checkpoints store it). grain
    marks "no partly used document" with the tuple (-1, -1) and compares it with `!=`, so the
    list JSON gives back reads as a partly used document: a run checkpointed where a document
    ended with a row would resume a document early."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())


class _JsonStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


class Tally:
    """Token counts of prepared records, in source order."""

    def __init__(self):
        self.tokens = 0

    def add(self, array: np.ndarray) -> None:
        self.tokens += len(array)

    def summary(self, train: tuple[int, int], seq_len: int | None, bins: int) -> dict:
        """The counts; `train`: the train split's [start, stop) records."""
        return {"tokens": self.tokens}


class _SftTally(Tally):
    def __init__(self):
        super().__init__()
        self.loss_tokens, self.lengths = 0, []

    def add(self, array):
        tokens, mask = array.reshape(2, -1)
        self.tokens += len(tokens)
        self.loss_tokens += int(mask.sum())
        self.lengths.append(len(tokens) - 1)

    def summary(self, train, seq_len, bins):
        """Plus, given `seq_len`, the rows one epoch of the train split packs into (to size
        `train.steps` for a number of epochs)."""
        out = {"tokens": self.tokens, "loss_tokens": self.loss_tokens}
        if seq_len is not None:
            lo, hi = train
            rows = first_fit_rows(self.lengths[lo:hi], seq_len, bins)
            out.update(seq_len=seq_len, rows_per_epoch=rows)
        return out


def _lengths(seq_len: int) -> dict[str, int]:
    return dict.fromkeys(FEATURES, seq_len)


def first_fit_rows(lengths: list[int], seq_len: int, bins: int) -> int:
    """Rows the SFT packer makes from samples of these lengths (grain's first-fit: fill up to
    `bins` rows, emit them all when a sample fits none); over-long samples count as full."""
    rows, free = 0, []
    for n in lengths:
        n = min(n, seq_len)
        slot = next((i for i, room in enumerate(free) if room >= n), None)
        if slot is None and len(free) == bins:
            rows, free = rows + len(free), []
        if slot is None:
            free.append(seq_len - n)
        else:
            free[slot] -= n
    return rows + len(free)


KINDS: dict[str, DataKind] = {kind.name: kind for kind in (_Cpt(), _Sft())}


def data_kind(name: str) -> DataKind:
    """The kind named by `data.kind` (or a prepared directory's `kind`)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"data.kind={name!r}: known kinds {sorted(KINDS)}") from None
