"""Training data: sources registered by name, packed rows, deterministic batches by step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from infir2_jax.config import DataConfig
from infir2_jax.data.jsonl_text import (
    DataError,
    load_tokenizer,
    read_jsonl_texts,
    tokenize_documents,
)
from infir2_jax.data.packing import PackedRows, pack_documents
from infir2_jax.data.synthetic import arithmetic_documents


def _synthetic(cfg: DataConfig) -> list[np.ndarray]:
    return arithmetic_documents(cfg.synthetic_documents)


def _jsonl(cfg: DataConfig) -> list[np.ndarray]:
    if cfg.path is None:
        raise DataError("data.path: required for data.source=jsonl")
    texts = read_jsonl_texts(cfg.path, cfg.text_field)  # validate the data before the slow part
    return tokenize_documents(texts, load_tokenizer(cfg.tokenizer))


SOURCES: dict[str, Callable[[DataConfig], list[np.ndarray]]] = {
    "synthetic": _synthetic,
    "jsonl": _jsonl,
}


class PackedDataset:
    """Packed rows served as global batches; batch `step` depends only on (seed, step), so a
    resumed run continues with exactly the rows the uninterrupted run would have seen."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int):
        if len(rows) < batch_size:
            raise DataError(
                f"dataset has {len(rows)} packed rows, fewer than one batch ({batch_size})"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._order: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order:
            self._order = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            }
        return self._order[epoch]

    def row_indices(self, step: int) -> np.ndarray:
        sample = step * self.batch_size + np.arange(self.batch_size)
        n = len(self.rows)
        return np.array([self._epoch_order(int(i // n))[i % n] for i in sample])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.rows.batch(self.row_indices(step))


def build_dataset(
    cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, vocab_size: int
) -> PackedDataset:
    documents = SOURCES[cfg.source](cfg)
    top = max(int(d.max()) for d in documents if len(d))
    if top >= vocab_size:
        raise DataError(f"data: token id {top} does not fit model.vocab_size={vocab_size}")
    return PackedDataset(pack_documents(documents, seq_len), batch_size, seed)


__all__ = ["SOURCES", "DataError", "PackedDataset", "PackedRows", "build_dataset", "pack_documents"]
