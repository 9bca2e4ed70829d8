"""Packing documents into fixed-length rows with segment ids and positions.

Documents are concatenated into one stream and cut into rows of `seq_len + 1` tokens (inputs
are the first `seq_len`, labels the last `seq_len`). Within a row, `segment_ids` number the
documents from 1 so attention never crosses a document; positions restart at 0 at every
document start (and at the start of every row, for a document continued from the last row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedRows:
    tokens: np.ndarray  # [rows, seq_len + 1] int32
    segment_ids: np.ndarray  # [rows, seq_len + 1] int32, documents numbered from 1 per row
    positions: np.ndarray  # [rows, seq_len + 1] int32

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for the given row indices: next-token targets, document-aware mask."""
        tokens, seg, pos = self.tokens[rows], self.segment_ids[rows], self.positions[rows]
        return {
            "input_ids": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "positions": pos[:, :-1],
            "segment_ids": seg[:, :-1],
            # A label counts only if it continues the same document as its input token.
            "loss_mask": (seg[:, 1:] == seg[:, :-1]).astype(np.int32),
        }


def pack_documents(documents: Sequence[np.ndarray], seq_len: int) -> PackedRows:
    """Packs token documents (each already ending with EOS) into rows; the tail is dropped."""
    if not documents:
        raise ValueError("no documents to pack")
    width = seq_len + 1
    lengths = np.array([len(d) for d in documents])
    stream = np.concatenate(documents).astype(np.int32)
    doc_index = np.repeat(np.arange(len(documents)), lengths)
    doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = np.arange(len(stream)) - np.repeat(doc_start, lengths)
    rows = len(stream) // width
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens are fewer than one row of {width}")
    n = rows * width
    tokens = stream[:n].reshape(rows, width)
    doc_index = doc_index[:n].reshape(rows, width)
    positions = positions[:n].reshape(rows, width)
    segment_ids = (doc_index - doc_index[:, :1] + 1).astype(np.int32)
    first_doc = segment_ids == 1
    positions = np.where(first_doc, positions - positions[:, :1], positions).astype(np.int32)
    return PackedRows(tokens, segment_ids, positions)
