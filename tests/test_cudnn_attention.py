"""cuDNN packed flash attention, what can be checked without a GPU: the segment spans it is
given (against the XLA mask they replace), the choice of implementation, and the host check
of segments per row. Its compilation for an H100 is in tests/test_gpu_compile.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from infir2_jax.config import ConfigError
from infir2_jax.kernels.cudnn_attention import max_runs, segment_spans
from infir2_jax.model.attention import attention_mask
from infir2_jax.model.attention_impl import resolve_implementation


def _packed_rows(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """Rows of 1–6 documents with increasing ids, some with trailing padding (id 0)."""
    rows = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        docs = int(rng.integers(1, 7))
        used = seq - int(rng.integers(0, seq // 4)) if r % 2 else seq
        cuts = np.sort(rng.choice(np.arange(1, used), size=docs - 1, replace=False))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, used], strict=True)):
            rows[r, a:b] = i + 1
    return rows


def _mask_from_spans(seqlens: np.ndarray, offsets: np.ndarray, seq: int) -> np.ndarray:
    """[batch, seq, seq]: what cuDNN's PADDING_CAUSAL masking does with packed spans —
    causal inside each span, nothing across spans."""
    batch = seqlens.shape[0]
    mask = np.zeros((batch, seq, seq), bool)
    for b in range(batch):
        for length, start in zip(seqlens[b], offsets[b], strict=False):
            if length < 0:
                continue
            span = np.arange(start, start + length)
            mask[b][np.ix_(span, span)] = span[:, None] >= span[None, :]
    return mask


def test_segment_spans_by_hand():
    ids = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    seqlens, offsets = segment_spans(ids, max_segments=4)
    np.testing.assert_array_equal(seqlens, [[3, 2, 2, -1], [7, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
    assert max_runs(np.asarray(ids)) == 3


@pytest.mark.parametrize("seq", [64, 257])
def test_segment_spans_mask_exactly_what_the_xla_path_masks(seq):
    """Packed rows (up to 6 documents, padding): the spans' causal-within-span mask equals
    the XLA path's mask (same segment id and causal by token index), token for token."""
    rows = _packed_rows(np.random.default_rng(seq), batch=6, seq=seq)
    seqlens, offsets = (np.asarray(a) for a in segment_spans(jnp.asarray(rows), 8))
    index = jnp.arange(seq)
    xla = np.asarray(attention_mask(index, index, jnp.asarray(rows), jnp.asarray(rows)))[:, 0]
    np.testing.assert_array_equal(_mask_from_spans(seqlens, offsets, seq), xla)
    # every token is in exactly one span (padding included): defined outputs everywhere
    covered = np.where(seqlens >= 0, seqlens, 0).sum(axis=1)
    np.testing.assert_array_equal(covered, seq)


def test_implementation_choice_without_a_gpu():
    bf16 = jnp.bfloat16
    assert resolve_implementation("auto", 128, bf16, context_parallel=False) == "chunked"
    assert resolve_implementation("chunked", 128, bf16, context_parallel=False) == "chunked"
    assert resolve_implementation(None, 128, bf16, context_parallel=False) is None
    with pytest.raises(ValueError, match="attention_impl=cudnn cannot run here: not compiling"):
        resolve_implementation("cudnn", 128, bf16, context_parallel=False)
    with pytest.raises(ValueError, match="context parallelism"):
        resolve_implementation("cudnn", 128, bf16, context_parallel=True)


def test_too_many_segments_in_a_row_is_a_clear_error():
    from infir2_jax.train.loop import _global_batch

    rows = np.repeat(np.arange(1, 9, dtype=np.int32), 4)[None]  # 8 documents of 4 tokens
    batch = {k: rows for k in ("input_ids", "labels", "positions", "segment_ids")}
    batch["loss_mask"] = np.ones_like(rows, np.float32)
    with pytest.raises(ConfigError, match=r"model.max_segments=4: a row of this batch holds 8"):
        _global_batch(batch, sharding=None, max_segments=4)
