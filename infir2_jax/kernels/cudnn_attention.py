"""cuDNN flash attention for packed rows, through JAX's cuDNN binding.

A packed row holds several documents back to back (`segment_ids` number them; padding is
segment 0 at the end). cuDNN's "THD" form takes, per row, each segment's start and length
(`q_offsets`/`kv_offsets`, `q_seqlen`/`kv_seqlen`, [batch, max_segments(+1)], -1 padded) with
a causal mask inside each segment: no [seq, seq] mask, bias or score buffer exists, and
cuDNN skips the blocks the mask empties. We derive those arrays inside the jitted step from
the segment ids: a segment is a *run* of equal ids, which is the same thing as our XLA mask
(equal ids, causal) whenever each id occupies one contiguous run, as our packer writes them.
Padding forms its own run(s), so every token has a defined output.

The binding (`jax._src.cudnn.fused_attention_stablehlo`) is private: everything that touches
it is in this module, checked on jax/jaxlib 0.10.2 (cuDNN 9.x). It needs a Hopper GPU for
packed rows, head_dim <= 256 and a multiple of 8, and BF16/FP16 inputs;
`unsupported_reason` says what does not fit before anything is traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from infir2_jax.compat import triton_target

if TYPE_CHECKING:
    from infir2_jax.target import Target

MIN_CAPABILITY = (9, 0)  # packed (THD) rows: Hopper and later
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _binding():
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


@contextlib.contextmanager
def compile_target(capability: tuple[int, int]) -> Iterator[None]:
    """Compile for a GPU of `capability` from a machine without one (compile-only: the
    planner and tests): the binding checks the local backend's device (the CPU here) for
    Hopper while tracing; this makes it check the target. What runs is decided by the plan's
    `Target`, not here."""
    fa = _binding()

    def at_least(c: str) -> bool:
        return capability >= tuple(int(x) for x in c.split("."))

    def equal(c: str) -> bool:
        return capability == tuple(int(x) for x in c.split("."))

    saved = fa.check_compute_capability, fa.is_cuda_compute_capability_equal
    fa.check_compute_capability, fa.is_cuda_compute_capability_equal = at_least, equal
    try:
        with triton_target(capability):  # the Pallas kernels' lowering too
            yield
    finally:
        fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved


def unsupported_reason(head_dim: int, dtype, target: Target) -> str | None:
    """Why cuDNN packed flash attention cannot run this model on `target` (None: it can)."""
    capability = target.capability
    if not target.is_cuda or capability is None:
        return "not compiling for a CUDA GPU"
    if capability < MIN_CAPABILITY:
        return f"packed rows need a Hopper GPU (compute capability 9.0), this is {capability}"
    if head_dim > 256 or head_dim % 8:
        return f"head_dim {head_dim} (cuDNN needs <= 256 and a multiple of 8)"
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (cuDNN flash attention takes bfloat16/float16)"
    try:
        _binding().check_cudnn_version()
    except Exception as e:  # noqa: BLE001 - any failure to find cuDNN means "not here"
        return f"cuDNN not found ({e})"
    return None


def segment_spans(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """(seqlens [batch, M], offsets [batch, M + 1]) of the runs of equal ids in each row of
    `segment_ids` [batch, seq], M = max_segments, unused entries -1 (cuDNN's packed form).
    A row with more than M runs would have its last slot absorb the rest of the row, across
    documents: check with `max_runs` on the host first (the train loop does)."""
    batch, seq = segment_ids.shape
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    first = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments, fill_value=-1)[0])(starts)
    first = first.astype(jnp.int32)  # [batch, M]
    count = jnp.minimum(jnp.sum(starts, axis=1), max_segments)[:, None]
    ends = jnp.concatenate([first[:, 1:], jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    slot = jnp.arange(max_segments)[None, :]
    ends = jnp.where(slot == count - 1, seq, ends)  # the last run ends the row
    valid = slot < count
    seqlens = jnp.where(valid, ends - first, -1)
    offsets = jnp.where(valid, first, -1)
    offsets = jnp.concatenate([offsets, jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    return seqlens.astype(jnp.int32), offsets.astype(jnp.int32)


def max_runs(segment_ids: np.ndarray) -> int:
    """The largest number of runs of equal ids in a row of a host [batch, seq] array."""
    ids = np.asarray(segment_ids)
    if ids.size == 0:
        return 0
    return int((1 + np.sum(ids[:, 1:] != ids[:, :-1], axis=1)).max())


def packed_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, max_segments: int
) -> jax.Array:
    """Causal attention within each run of `segment_ids`: q [batch, seq, heads, dim], k/v
    [batch, seq, kv_heads, dim] (grouped-query: heads a multiple of kv_heads), one cuDNN
    flash attention call forward and one backward. Returns [batch, seq, heads, dim]."""
    fa = _binding()
    seqlens, offsets = segment_spans(segment_ids, max_segments)
    return fa.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=seqlens,
        kv_seqlen=seqlens,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5,
        mask_type=fa.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
