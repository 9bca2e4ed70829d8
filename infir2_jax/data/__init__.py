"""Training data: record sources -> examples (CPT text, SFT chat) -> packed batches, on grain."""

from infir2_jax.data.pipeline import (
    DataPipeline,
    check_vocab,
    open_source,
    overlong_counts,
    sample_ids,
    split_bounds,
)
from infir2_jax.data.records import DataError, Record
from infir2_jax.data.tokenizer import load_tokenizer

__all__ = [
    "DataError",
    "DataPipeline",
    "Record",
    "check_vocab",
    "load_tokenizer",
    "open_source",
    "overlong_counts",
    "sample_ids",
    "split_bounds",
]
