"""Context parallelism: causal attention over a sequence split across the `context` axis.

Load balance. With a causal mask, the last chunk of a sequence attends to everything and the
first to almost nothing, so a plain split leaves the first device idle. The sequence is cut
into 2 × cp chunks and device i holds chunks i and 2cp-1-i (one early, one late: equal causal
work). The model permutes its integer inputs into this order once at the start
(`load_balanced_order`); every token-wise op is order-agnostic, the loss is a sum over tokens
(labels and mask are permuted alike), and attention masks by each token's *original* index,
so nothing else needs to know.

K/V exchange: all-gather, not a ring. Qwen2.5 uses grouped-query attention (7B: 28 query
heads, 4 K/V heads), so gathering K and V of the whole sequence moves 2·4/28 of what the
queries weigh — at 32k tokens, 4 K/V heads × 128 × 2 bytes × 2 = 64 MiB per layer for the
whole sequence, small next to one layer's activations — and it is a single collective that
XLA can overlap with the Q projection, with no per-step online-softmax merging. A ring
(`ppermute` of K/V blocks, cp steps, log-sum-exp merge of partial outputs) only pays off when
the full K/V of one layer does not fit, i.e. far beyond 128k tokens; it would replace
`_gather_kv` + `attend` below with a loop of `attend` on each arriving block and an online
merge, with the same shard_map signature and the same load-balanced order.

Flash attention. `execution.attention_impl: auto` uses our Pallas kernel (GPU) or XLA's
chunked attention here, not cuDNN's packed flash attention: its packed form wants every
segment as one contiguous span with the causal diagonal at the span's start, and here each
device's queries are two separate chunks of the row (the load balance) against K/V gathered
in load-balanced order. Making it fit means un-permuting the gathered K/V (cheap under GQA)
and attending each query chunk to its segments' prefixes with a bottom-right-aligned causal
mask, which JAX's cuDNN binding (0.10.2) does not expose; a Pallas flash kernel taking
query/key index offsets is the other way.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from infir2_jax.parallel.rules import Layout


def load_balanced_order(seq_len: int, cp: int) -> np.ndarray:
    """Original token index at each position of the load-balanced sequence ([seq_len])."""
    chunks = 2 * cp
    if seq_len % chunks:
        raise ValueError(
            f"train.seq_len={seq_len} must divide into 2 × parallel.context = {chunks} chunks "
            "for load-balanced context parallelism"
        )
    size = seq_len // chunks
    order = [c for i in range(cp) for c in (i, chunks - 1 - i)]
    return np.concatenate([np.arange(c * size, (c + 1) * size) for c in order])


def context_parallel_attention(
    layout: Layout,
    attend: Callable[..., jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    token_index: jax.Array,
    segment_ids: jax.Array,
    *,
    check_vma: bool = True,
) -> jax.Array:
    """`attend(q, k, v, q_index, k_index, q_segments, k_segments)` with the sequence split over
    `context`: each device keeps its queries and gathers every device's K/V (and their token
    indices and segment ids) before attending.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (load-balanced
    order); token_index: [seq] original positions; segment_ids: [batch, seq]. `check_vma`:
    off for a Pallas `attend` (kernels/flash_attention.py).
    """
    q_spec = layout.spec(("batch", "inner_seq", "act_heads", None))
    kv_spec = layout.spec(("batch", "inner_seq", "act_kv_heads", None))
    index_spec = layout.spec(("inner_seq",))
    segment_spec = layout.spec(("batch", "inner_seq"))

    def local(q, k, v, index, segments):
        k_all, v_all, index_all, segments_all = _gather_kv(k, v, index, segments)
        return attend(q, k_all, v_all, index, index_all, segments, segments_all)

    return jax.shard_map(
        local,
        mesh=layout.mesh,
        in_specs=(q_spec, kv_spec, kv_spec, index_spec, segment_spec),
        out_specs=q_spec,
        check_vma=check_vma,
    )(q, k, v, token_index, segment_ids)


def _gather_kv(k, v, index, segments):
    gather = lambda x, axis: jax.lax.all_gather(x, "context", axis=axis, tiled=True)  # noqa: E731
    return gather(k, 1), gather(v, 1), gather(index, 0), gather(segments, 1)
