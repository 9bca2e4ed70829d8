"""The grain pipeline: records -> examples -> packed rows -> this host's share of each batch.

    source --split (train/val/test by index ranges)--> this host's slice (index % hosts)
      --shuffle(seed), new order every epoch, endless (train only)--> examples (tokenize, mask)
      --pack to seq_len--> rows --batch(global batch / hosts)--> [worker processes]

What differs between CPT and SFT lives in the `DataKind` of `data.kind` (data/kinds.py).
Packing: CPT concatenates documents and cuts rows (a long document continues in the next row;
nothing is padded or dropped); SFT packs whole samples first-fit into `data.pack_bins` rows at
a time and pads the rest (a sample is never split). Inside a row, `segment_ids` number the
samples from 1 (0 = padding) and `positions` restart at 0 for each, so attention never crosses
samples. The training iterator is a stateful grain iterator; its state goes into every
checkpoint, so a resumed run reads exactly the next batch (with the same `data.workers`).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from infir2_jax.config import DataConfig
from infir2_jax.data.examples import FEATURES
from infir2_jax.data.kinds import data_kind
from infir2_jax.data.prepared import PreparedSource
from infir2_jax.data.records import (
    ArrayRecordJsonSource,
    DataError,
    InMemorySource,
    JsonlSource,
    ParquetSource,
    expand_paths,
)
from infir2_jax.data.synthetic import arithmetic_documents
from infir2_jax.data.tokenizer import LazyTokenizer

Batch = dict[str, np.ndarray]


def open_source(cfg: DataConfig):
    """The configured record source (raises DataError for missing or malformed input)."""
    kind = data_kind(cfg.kind)
    field = kind.field(cfg)
    if cfg.source == "synthetic":
        if kind.chat:
            raise DataError("data.source=synthetic only provides pre-training text (kind: cpt)")
        return InMemorySource(arithmetic_documents(cfg.synthetic_documents), "synthetic")
    if cfg.source == "gsm8k":
        # Imported here: the package must not import the module `python -m` runs as its CLI.
        from infir2_jax.data.gsm8k import gsm8k_source

        if not kind.chat and cfg.tokens_field is not None:
            raise DataError("data.tokens_field: data.source=gsm8k holds text, not token ids")
        return gsm8k_source(kind, field, cfg.path)
    if cfg.source == "jsonl":
        return JsonlSource(
            expand_paths(cfg.path, (".jsonl", ".json")), field, cfg.max_document_bytes
        )
    if cfg.source == "parquet":
        return ParquetSource(expand_paths(cfg.path, (".parquet",)), field, cfg.max_document_bytes)
    if cfg.source == "arrayrecord":
        return ArrayRecordJsonSource(
            expand_paths(cfg.path, (".array_record",)), field, cfg.max_document_bytes
        )
    return PreparedSource(cfg.path, kind)


def needs_tokenizer(cfg: DataConfig) -> bool:
    """Whether records are text to tokenize (not token ids already)."""
    if cfg.source in ("prepared", "synthetic"):
        return False
    return data_kind(cfg.kind).needs_tokenizer(cfg)


def split_bounds(n: int, fractions: tuple[float, ...]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) index ranges for train/val/test (Megatron's split)."""
    edges = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * n).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


class _WithIndex:
    """(source index, record): the index is the sample id carried into every batch. Grain
    passes indices past the end on later epochs (reading them modulo the length)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, index: int, record):
        return index % self.length, record


class _Apply:
    def __init__(self, make):
        self.make = make

    def __call__(self, item):
        index, record = item
        return self.make(index, record)


def _model_inputs(row: dict[str, np.ndarray]) -> Batch:
    out = {name: row[name] for name in FEATURES}
    out["positions"] = row["input_ids_positions"]
    out["segment_ids"] = row["input_ids_segment_ids"]
    return out


@dataclasses.dataclass
class DataPipeline:
    cfg: DataConfig
    seq_len: int
    global_batch: int
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.global_batch % self.process_count:
            raise DataError(
                f"train.batch_size={self.global_batch} does not split over "
                f"{self.process_count} hosts"
            )
        self.host_batch = self.global_batch // self.process_count
        self.streams = self.cfg.streams or self.process_count
        if self.streams % self.process_count or self.global_batch % self.streams:
            raise DataError(
                f"data.streams={self.streams} must be a multiple of the {self.process_count} "
                f"hosts and divide train.batch_size={self.global_batch}"
            )
        # This host's streams: a contiguous block, so the hosts' rows concatenate (in
        # process order) into the same global batch for any host count.
        per_host = self.streams // self.process_count
        self.host_streams = range(
            self.process_index * per_host, (self.process_index + 1) * per_host
        )
        self.source = open_source(self.cfg)
        self.bounds = dict(
            zip(
                ("train", "val", "test"),
                split_bounds(len(self.source), self.cfg.split),
                strict=True,
            )
        )
        lo, hi = self.bounds["train"]
        if hi - lo < self.streams:
            raise DataError(
                f"data: the train split has {hi - lo} documents (of {len(self.source)}, "
                f"data.split={list(self.cfg.split)}), fewer than the {self.streams} streams "
                "(data.streams, default: one per host)"
            )
        tokenizer = LazyTokenizer(self.cfg.tokenizer, self.cfg.chat_template)
        if needs_tokenizer(self.cfg):
            tokenizer.get()  # a missing or broken tokenizer fails now, not in a worker
        self.kind = data_kind(self.cfg.kind)
        self.examples = self.kind.examples(self.cfg, tokenizer, self.seq_len)

    def _batches(self, split: str, *, train: bool) -> grain.IterDataset:
        """This host's batches: each of its streams batched, then concatenated row-wise."""
        rows_per_stream = self.global_batch // self.streams
        parts = [
            self._rows(split, stream, train=train).batch(rows_per_stream, drop_remainder=True)
            for stream in self.host_streams
        ]
        if len(parts) == 1:
            return parts[0]
        return grain.experimental.ZipIterDataset(parts).map(_concatenate_rows)

    def _rows(self, split: str, stream: int, *, train: bool) -> grain.IterDataset:
        lo, hi = self.bounds[split]
        ds = grain.MapDataset.source(self.source).map_with_index(_WithIndex(len(self.source)))[
            lo:hi
        ]
        ds = ds[stream :: self.streams]
        if train:
            ds = ds.shuffle(seed=self.seed).repeat()
        ds = ds.map(_Apply(self.examples)).to_iter_dataset()
        return self.kind.pack(ds, self.cfg, self.seq_len, self.seed).map(_model_inputs)

    def train_iterator(self) -> grain.DatasetIterator:
        """Endless iterator of this host's batches; `get_state`/`set_state` checkpoint it."""
        ds = self._batches("train", train=True)
        if self.cfg.workers > 0:
            from absl import flags

            # grain's workers read absl flags; outside absl.app nothing has parsed them.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.workers))
        return iter(ds)

    def eval_batches(self, count: int) -> list[Batch]:
        """The first `count` batches of the validation split (the same ones every time)."""
        lo, hi = self.bounds["val"]
        if hi - lo < self.streams:
            raise DataError(
                f"data.split={list(self.cfg.split)} leaves {hi - lo} validation documents; "
                "train.eval_every needs a validation split"
            )
        ds = self._batches("val", train=False)
        batches = []
        for batch in ds:
            batches.append(batch)
            if len(batches) == count:
                break
        if not batches:
            raise DataError("data: the validation split holds less than one batch")
        return batches


def _concatenate_rows(batches: tuple[Batch, ...]) -> Batch:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def sample_ids(batch: Batch) -> list[list[int]]:
    """Per row, the source indices of the samples it holds, in order."""
    out = []
    for row in batch["doc_ids"]:
        ids = row[row > 0]
        keep = np.concatenate([[True], ids[1:] != ids[:-1]]) if len(ids) else ids.astype(bool)
        out.append([int(i) - 1 for i in ids[keep]])
    return out


def check_vocab(batch: Batch, vocab_size: int) -> None:
    """Token ids past the embedding table would be silently clamped by the gather; refuse."""
    bad = (batch["input_ids"] >= vocab_size) | (batch["labels"] >= vocab_size)
    if bad.any():
        rows = np.nonzero(bad.any(-1))[0]
        top = int(max(batch["input_ids"].max(), batch["labels"].max()))
        samples = sample_ids({"doc_ids": batch["doc_ids"][rows]})
        raise DataError(
            f"data: token id {top} does not fit model.vocab_size={vocab_size} "
            f"(in samples {sorted({i for row in samples for i in row})})"
        )
