"""cuDNN packed flash attention, what can be checked without a GPU: the segment spans it is
given (against the XLA mask they replace), the choice of implementation, and the host check
of segments per row. Its compilation for an H100 is in tests/test_gpu_compile.py."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from infir2_jax.kernels.cudnn_attention import max_runs, segment_spans
from infir2_jax.model.attention import attention_mask
from infir2_jax.model.attention_impl import resolve_implementation
from infir2_jax.target import Target


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
    resolve = functools.partial(resolve_implementation, target=Target())
    assert resolve("auto", 128, bf16) == "chunked"
    assert resolve("chunked", 128, bf16) == "chunked"
    assert resolve(None, 128, bf16) is None
    assert resolve("pallas", 128, bf16, context=2, seq_len=512) == "pallas"
    with pytest.raises(ValueError, match="attention_impl=cudnn cannot run here: not compiling"):
        resolve("cudnn", 128, bf16)
    with pytest.raises(ValueError, match="context parallelism"):
        resolve("cudnn", 128, bf16, context=2)
    with pytest.raises(ValueError, match="per-device length of 160 tokens"):
        resolve("pallas", 128, bf16, context=2, seq_len=320)
    with pytest.raises(ValueError, match="head_dim 72"):
        resolve("pallas", 72, bf16)


def test_implementation_choice_for_a_named_hopper_target():
    """The plan decides for the target it is given, not for the machine it runs on: `auto`
    is cuDNN for an H100 (without context parallelism), Pallas under it; an older GPU gets
    Pallas; the cuDNN plan falls back to Pallas for rows with too many segments."""
    from infir2_jax.model import ExecutionConfig, preset, resolve_plan

    h100, a100 = Target("cuda", (9, 0), "h100"), Target("cuda", (8, 0), "a100")
    cfg = preset("tiny").replace(dtype="bfloat16")
    auto = ExecutionConfig(attention_impl="auto")
    try:
        plan = resolve_plan(cfg, auto, target=h100, seq_len=256)
    except ValueError as e:  # no cuDNN library here at all
        pytest.skip(str(e))
    if plan.attention != "cudnn":
        pytest.skip("cuDNN is not installed here")
    assert plan.segment_limit == 32 and plan.fallback().attention == "pallas"
    assert plan.fallback().segment_limit is None
    assert resolve_plan(cfg, auto, target=a100, seq_len=256).attention == "pallas"
    assert resolve_plan(cfg, auto, seq_len=256).attention == "chunked"  # this CPU


def test_batches_with_more_segments_than_cudnn_takes_run_the_pallas_kernel():
    """A row with more segments than execution.max_segments never stops a run: that batch goes
    through the same steps built with the Pallas kernel (built once, said once)."""
    import io

    from infir2_jax.train.runner import Steps

    built = []

    def build(parts):
        built.append(parts)
        return f"train-{parts}", f"eval-{parts}"

    out = io.StringIO()
    steps = Steps(build, "cudnn", lambda: "pallas", 4, out)
    few = {"segment_ids": np.repeat(np.arange(1, 5, dtype=np.int32), 8)[None]}  # 4 runs
    many = {"segment_ids": np.repeat(np.arange(1, 9, dtype=np.int32), 4)[None]}  # 8 runs
    assert steps.for_batch(few) == ("train-cudnn", "eval-cudnn")
    assert steps.for_batch(many) == ("train-pallas", "eval-pallas")
    assert steps.for_batch(many) == ("train-pallas", "eval-pallas")
    assert built == ["cudnn", "pallas"]
    assert "a row holds 8 segments, more than execution.max_segments=4" in out.getvalue()
    # attention that is not cuDNN (no segment limit) never looks at segments
    assert Steps(build, "xla", lambda: "pallas", None, out).for_batch(many) == (
        "train-xla",
        "eval-xla",
    )


def test_the_fallback_plan_is_the_pallas_kernel():
    """The plan decides the segment limit (cuDNN only) and its fallback: the Pallas kernel."""
    from infir2_jax.model import ExecutionConfig, ExecutionPlan

    cudnn = ExecutionPlan(
        ExecutionConfig(max_segments=4), attention="cudnn", fallback_attention="pallas"
    )
    assert cudnn.segment_limit == 4
    assert cudnn.fallback().attention == "pallas" and cudnn.fallback().segment_limit is None
    assert ExecutionPlan(ExecutionConfig(max_segments=4), attention="chunked").segment_limit is None
