"""Training data: record sources -> examples (CPT text, SFT chat) -> packed batches, on grain."""

from infir2_jax.data.kinds import OVERLONG_COUNTERS, DataKind, data_kind
from infir2_jax.data.pipeline import (
    DataPipeline,
    check_vocab,
    open_source,
    sample_ids,
    split_bounds,
)
from infir2_jax.data.records import DataError, Record
from infir2_jax.data.tokenizer import load_tokenizer

__all__ = [
    "DataError",
    "DataKind",
    "OVERLONG_COUNTERS",
    "DataPipeline",
    "Record",
    "check_vocab",
    "data_kind",
    "load_tokenizer",
    "open_source",
    "sample_ids",
    "split_bounds",
]
