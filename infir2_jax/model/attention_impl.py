"""Which attention implementation runs (`execution.attention_impl`, resolved once into the
execution plan: model/execution.py), and the flash kernels run per device.

    auto     cudnn where it runs; else pallas on a CUDA GPU; else chunked (CPU)
    cudnn    cuDNN flash attention for packed rows (kernels/cudnn_attention.py): Hopper, no
             context parallelism
    pallas   our Pallas flash attention (kernels/flash_attention.py): any CUDA GPU, context
             parallelism included; on the CPU it runs in Pallas' interpreter (tests)
    chunked  XLA attention on [attention_chunk_size, seq] scores at a time (any platform)
    xla      one jax.nn.dot_product_attention call with an explicit [seq, seq] mask

A kernel is opaque to XLA's SPMD partitioner, so flash attention runs inside a shard_map
(rows over the data axes, heads over tensor); under context parallelism it is already inside
one (parallel/context.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from infir2_jax.kernels import cudnn_attention
from infir2_jax.kernels.flash_attention import flash_attention
from infir2_jax.parallel.rules import Layout
from infir2_jax.target import Target

FLASH = ("cudnn", "pallas")


def _pallas_unsupported(
    head_dim: int, lengths: tuple[int, ...], block: int, compiled: bool
) -> str | None:
    """Why the Pallas kernel cannot take these shapes (None: it can). Compiled (Triton), its
    tiles must be powers of two >= 16; interpreted, they need only divide the lengths."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} (the Pallas kernel takes powers of two >= 16)"
    for length in lengths:
        tile = min(block, length)
        if length % tile or (compiled and (tile < 16 or tile & (tile - 1))):
            return (
                f"a per-device length of {length} tokens (it must be a multiple of "
                f"execution.attention_block={block}, or a power of two >= 16 below it)"
            )
    return None


def resolve_implementation(
    requested: str | None,
    head_dim: int,
    dtype,
    *,
    target: Target,
    context: int = 1,
    seq_len: int | None = None,
    block: int = 128,
) -> str | None:
    """The implementation that runs for `requested` on `target`, rows of `seq_len` tokens
    (None: any length) split over `context` devices; an explicit flash implementation that
    cannot run is an error naming why."""
    lengths = () if seq_len is None else (seq_len // context, seq_len)
    on_cuda = target.is_cuda
    pallas_reason = _pallas_unsupported(head_dim, lengths, block, compiled=on_cuda)
    if requested == "pallas":
        if pallas_reason:
            raise ValueError(f"execution.attention_impl=pallas cannot run here: {pallas_reason}")
        return "pallas"
    if requested not in ("auto", "cudnn"):
        return requested
    reason = (
        # Each device's queries are two separate chunks of the row and the gathered K/V
        # are in load-balanced order: cuDNN's packed form wants every segment contiguous
        # with its causal diagonal at the segment's start (parallel/context.py).
        "context parallelism (parallel.context > 1) splits rows into non-contiguous chunks"
        if context > 1
        else cudnn_attention.unsupported_reason(head_dim, dtype, target)
    )
    if reason is None:
        return "cudnn"
    if requested == "cudnn":
        raise ValueError(
            f"execution.attention_impl=cudnn cannot run here: {reason}; use auto, pallas or chunked"
        )
    return "pallas" if on_cuda and pallas_reason is None else "chunked"


def _pallas(
    q, k, v, q_index, k_index, q_segments, k_segments, *, block, contiguous, compiled: bool
):
    """The Pallas kernel compiled for a CUDA target, or interpreted (any other target)."""
    lengths = (q.shape[1], k.shape[1])
    reason = _pallas_unsupported(q.shape[-1], lengths, block, compiled=compiled)
    if reason:  # the plan checked its row length; a fallback or another length gets here
        raise ValueError(f"execution.attention_impl=pallas cannot run here: {reason}")
    return flash_attention(
        q, k, v, q_index, k_index, q_segments, k_segments,
        block=block, contiguous=contiguous, interpret=not compiled,
    )  # fmt: skip


def flash(
    implementation: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_index: jax.Array,
    k_index: jax.Array,
    q_segments: jax.Array,
    k_segments: jax.Array,
    *,
    layout: Layout | None,
    compiled: bool,
    context_parallel: bool,
    max_segments: int,
    block: int,
) -> jax.Array:
    """Flash attention (`cudnn` or `pallas`), q [batch, tq, heads, d] over k/v [batch, tk,
    kv_heads, d], masked by token index and segment id as model/attention.py's mask, run per
    device on `layout` (None: one device); `compiled`: the Pallas kernel for a CUDA GPU
    (else Pallas' interpreter)."""
    pallas = functools.partial(_pallas, block=block, compiled=compiled)
    if context_parallel:  # already per device, inside the context-parallel shard_map
        if implementation != "pallas":
            raise ValueError(f"attention {implementation!r} under context parallelism")
        return pallas(q, k, v, q_index, k_index, q_segments, k_segments, contiguous=False)

    def run(q, k, v, segments):  # one whole row per device: indices 0..T-1
        if implementation == "cudnn":
            return cudnn_attention.packed_attention(q, k, v, segments, max_segments=max_segments)
        index = jnp.arange(q.shape[1], dtype=jnp.int32)
        return pallas(q, k, v, index, index, segments, segments, contiguous=True)

    if layout is None or layout.mesh.size == 1:
        return run(q, k, v, q_segments)
    # Partitioned by hand; for cuDNN also because JAX's own partitioning rule for the packed
    # call is rejected by Shardy's verifier when a device holds one row (jax 0.10.2).
    q_spec = layout.spec(("batch", "inner_seq", "act_heads", None))
    kv_spec = layout.spec(("batch", "inner_seq", "act_kv_heads", None))
    segment_spec = layout.spec(("batch", "inner_seq"))
    return jax.shard_map(
        run,
        mesh=layout.mesh,
        in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
        out_specs=q_spec,
        check_vma=checks_varying_axes(implementation),
    )(q, k, v, q_segments)


def checks_varying_axes(implementation: str | None) -> bool:
    """`check_vma` for a shard_map around this attention: off for the Pallas kernel, whose
    results carry no varying-axes types (kernels/flash_attention.py). Safe here: every float
    input of those shard_maps is split over every mesh axis of size > 1, so no cotangent
    needs the sum over replicas that the check would insert."""
    return implementation != "pallas"
