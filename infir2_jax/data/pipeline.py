"""The grain pipeline: records -> examples -> packed rows -> this host's share of each batch.

    source --split (train/val/test by index ranges)--> this host's slice (index % hosts)
      --shuffle(seed), new order every epoch, endless (train only)--> examples (tokenize, mask)
      --pack to seq_len--> rows --batch(global batch / hosts)--> [worker processes]

What differs between CPT and SFT lives in the `DataKind` of `data.kind` (data/kinds.py).
A mixture (`data.sources`) runs the chain up to the packed rows once per source and draws rows
from them with grain's `IterDataset.mix` in proportion to the weights (a fixed interleaving,
part of the iterator's state); sample ids count through the sources in order, so an id names
its source (`Component.offset`).
Packing: CPT concatenates documents and cuts rows (a long document continues in the next row;
nothing is padded or dropped); SFT packs whole samples first-fit into `data.pack_bins` rows at
a time and pads the rest (a sample is never split). Inside a row, `segment_ids` number the
samples from 1 (0 = padding) and `positions` restart at 0 for each, so attention never crosses
samples. The training iterator is a stateful grain iterator; its state goes into every
checkpoint, so a resumed run reads exactly the next batch (with the same `data.workers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

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


def open_source(cfg: DataConfig, key: str = "data.path"):
    """The configured record source (raises DataError for missing or malformed input); `key`
    names the path's setting in errors."""
    if cfg.sources is not None:
        raise DataError("data.sources: open each source on its own (`open_sources`)")
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
            expand_paths(cfg.path, (".jsonl", ".json"), key), field, cfg.max_document_bytes
        )
    if cfg.source == "parquet":
        files = expand_paths(cfg.path, (".parquet",), key)
        return ParquetSource(files, field, cfg.max_document_bytes)
    if cfg.source == "arrayrecord":
        return ArrayRecordJsonSource(
            expand_paths(cfg.path, (".array_record",), key), field, cfg.max_document_bytes
        )
    return PreparedSource(cfg.path, kind, key)


@dataclasses.dataclass(frozen=True)
class Component:
    """One source of the training data: the whole of it (`data.path`) or one of a mixture."""

    name: str
    weight: float
    source: Any  # a record source (data/records.py)
    offset: int  # added to its record indices: sample ids are unique over the sources

    def bounds(self, split: tuple[float, ...]) -> dict[str, tuple[int, int]]:
        return dict(
            zip(("train", "val", "test"), split_bounds(len(self.source), split), strict=True)
        )


def open_sources(cfg: DataConfig) -> list[Component]:
    """The sources of `data.path` (one) or `data.sources`, in order, with their names, weights
    and sample id offsets."""
    if cfg.sources is None:
        parts = [(cfg, 1.0, "data.path")]
    else:
        parts = [
            (
                dataclasses.replace(
                    cfg, sources=None, path=part.path, source=part.source or cfg.source
                ),
                part.weight,
                f"data.sources[{i}].path",
            )
            for i, part in enumerate(cfg.sources)
        ]
    components, offset = [], 0
    for name, (part, weight, key) in zip(cfg.source_names(), parts, strict=True):
        source = open_source(part, key)
        components.append(Component(name, weight, source, offset))
        offset += len(source)
    return components


def source_rows(components: list[Component], batch: Batch) -> dict[str, int]:
    """Rows of `batch` per source (a row holds samples of one source only), by name."""
    starts = np.asarray([c.offset for c in components])
    first = np.asarray([row[row > 0][0] - 1 if (row > 0).any() else -1 for row in batch["doc_ids"]])
    which = np.searchsorted(starts, first[first >= 0], side="right") - 1
    counts = np.bincount(which, minlength=len(components))
    return {c.name: int(n) for c, n in zip(components, counts, strict=True)}


def needs_tokenizer(cfg: DataConfig) -> bool:
    """Whether records (of any of the sources) are text to tokenize (not token ids already)."""
    if cfg.sources is not None:
        return any(
            needs_tokenizer(dataclasses.replace(cfg, sources=None, source=p.source or cfg.source))
            for p in cfg.sources
        )
    if cfg.source in ("prepared", "synthetic"):
        return False
    return data_kind(cfg.kind).needs_tokenizer(cfg)


def split_bounds(n: int, fractions: tuple[float, ...]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) index ranges for train/val/test (Megatron's split)."""
    edges = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * n).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


class _WithIndex:
    """(sample id, record): the source index (plus the source's offset in a mixture) is the
    sample id carried into every batch. Grain passes indices past the end on later epochs
    (reading them modulo the length)."""

    def __init__(self, length: int, offset: int = 0):
        self.length, self.offset = length, offset

    def __call__(self, index: int, record):
        return self.offset + index % self.length, record


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
        self.components = open_sources(self.cfg)
        for c in self.components:
            lo, hi = c.bounds(self.cfg.split)["train"]
            if hi - lo < self.streams:
                raise DataError(
                    f"data: the train split of {c.name} has {hi - lo} documents (of "
                    f"{len(c.source)}, data.split={list(self.cfg.split)}), fewer than the "
                    f"{self.streams} streams (data.streams, default: one per host)"
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
        """One stream's packed rows: of its one source, or of its sources — for training mixed
        by weight; held out (validation, test), every source's rows in turn to the last, so a
        small source's few rows do not end the split (a weighted mix stops at the first
        source that runs out)."""
        parts = [
            self._source_rows(c, i, split, stream, train=train)
            for i, c in enumerate(self.components)
        ]
        if len(parts) == 1:
            return parts[0]
        if not train:
            return grain.experimental.InterleaveIterDataset(parts, cycle_length=len(parts))
        return grain.IterDataset.mix(parts, [c.weight for c in self.components])

    def _source_rows(
        self, c: Component, i: int, split: str, stream: int, *, train: bool
    ) -> grain.IterDataset:
        lo, hi = c.bounds(self.cfg.split)[split]
        ds = grain.MapDataset.source(c.source).map_with_index(_WithIndex(len(c.source), c.offset))
        ds = ds[lo:hi][stream :: self.streams]
        seed = self.seed + i  # each source its own order (the first: the seed, as unmixed)
        if train:
            ds = ds.shuffle(seed=seed).repeat()
        ds = ds.map(_Apply(self.examples)).to_iter_dataset()
        return self.kind.pack(ds, self.cfg, self.seq_len, seed).map(_model_inputs)

    def source_rows(self, batch: Batch) -> dict[str, int]:
        """Rows of a batch per source name (the realized mixture)."""
        return source_rows(self.components, batch)

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
        val = min(hi - lo for c in self.components for lo, hi in [c.bounds(self.cfg.split)["val"]])
        if val < self.streams:
            raise DataError(
                f"data.split={list(self.cfg.split)} leaves {val} validation documents; "
                "train.eval_every needs a validation split"
            )
        ds = self._batches("val", train=False)
        batches = []
        for batch in ds:
            batches.append(batch)
            if len(batches) == count:
                break
        if not batches:
            raise DataError(
                f"data: the validation split holds less than one batch ({self.global_batch} rows "
                f"of {self.seq_len} tokens; data.split={list(self.cfg.split)}): raise its "
                "validation fraction, or set train.eval_every=0"
            )
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
