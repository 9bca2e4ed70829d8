"""Flash attention for packed rows in Pallas (Triton on GPU; Pallas' interpreter on the CPU).

Adapted from JAX's `jax/experimental/pallas/ops/gpu/attention.py` (Copyright 2023 The JAX
Authors, Apache License 2.0), changed for what our model needs:
- grouped-query attention without repeating K/V in HBM: query head h reads K/V head
  h // (heads / kv_heads) through the BlockSpec;
- the mask comes from explicit token indices and segment ids, `q_index >= k_index` and
  `q_segment == k_segment`, exactly our XLA mask (model/attention.py: attention_mask), so the
  kernel also serves context parallelism, where a device's queries are two chunks of the row
  in load-balanced order attending K/V gathered from every device;
- dK/dV and dQ are two kernels (query and key lengths may differ under context parallelism);
  for grouped queries dK/dV are computed per query head and summed over each group.

With `contiguous=True` (indices are 0..T-1, no context parallelism) the loops skip the key
blocks a query block cannot see (causal block skipping); otherwise every block is visited and
the mask does the work. FP32 softmax statistics (log-sum-exp, base 2) and accumulators; the
inputs' dtype for the dot operands. Verified on the CPU in interpret mode against XLA
attention (tests/test_flash_attention.py) and compiled for an H100 (tests/test_gpu_compile.py);
not yet run on a GPU.

Inside a shard_map the kernel needs `check_vma=False` (its results are not typed with the
mesh axes they vary over, and Pallas' interpreter loop does not type-check them, jax 0.10.2);
the model's shard_maps around it pass that (model/attention_impl.py, parallel/context.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)


def _masked_logits(q, k, q_idx, k_idx, q_seg, k_seg, scale):
    """[bq, bk] logits in base 2 (x·log2 e), masked by token index and segment id."""
    s = plgpu.dot(q, k.T) * (scale * LOG2_E)
    visible = (q_idx[:, None] >= k_idx[None, :]) & (q_seg[:, None] == k_seg[None, :])
    return jnp.where(visible, s, MASK_VALUE)


def _forward_kernel(
    q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, o_ref, lse_ref, *,
    scale, block_q, block_k, contiguous,
):  # fmt: skip
    start_q = pl.program_id(0)
    q = q_ref[...]
    q_idx, q_seg = qi_ref[...], qs_ref[...]
    d = q.shape[-1]

    def body(start_k, carry):  # online softmax: running max m, running denominator total
        o, m, total = carry
        ks = pl.ds(start_k * block_k, block_k)
        s = _masked_logits(q, k_ref[ks, :], q_idx, ki_ref[ks], q_seg, ks_ref[ks], scale)
        m_next = jnp.maximum(m, jnp.max(s, axis=-1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        total_next = correction * total + p.sum(axis=-1)
        o_next = correction[:, None] * o + plgpu.dot(p.astype(v_ref.dtype), v_ref[ks, :])
        return o_next, m_next, total_next

    k_len = k_ref.shape[0]
    if contiguous:  # keys past this query block's last token are all masked
        upper = lax.div(block_q * (start_q + 1) + block_k - 1, block_k)
    else:
        upper = k_len // block_k
    init = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    o, m, total = lax.fori_loop(0, upper, body, init)
    o_ref[...] = (o / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(total)


def _dkdv_kernel(
    q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
    dk_ref, dv_ref, *, scale, block_q, block_k, contiguous,
):  # fmt: skip
    start_k = pl.program_id(2)
    ks = pl.ds(start_k * block_k, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    k_idx, k_seg = ki_ref[ks], ks_ref[ks]
    d = k.shape[-1]

    def body(start_q, carry):
        dk, dv = carry
        qs = pl.ds(start_q * block_q, block_q)
        q, do = q_ref[qs, :], do_ref[qs, :]
        s = _masked_logits(q, k, qi_ref[qs], k_idx, qs_ref[qs], k_seg, scale)
        p = jnp.exp2(s - lse_ref[qs][:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
        dp = plgpu.dot(do, v.T) - delta_ref[qs][:, None]
        ds = p * dp * scale
        dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
        return dk, dv

    q_len = q_ref.shape[0]
    lower = lax.div(start_k * block_k, block_q) if contiguous else 0
    init = (jnp.zeros((block_k, d), jnp.float32), jnp.zeros((block_k, d), jnp.float32))
    dk, dv = lax.fori_loop(lower, q_len // block_q, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ref, k_ref, v_ref, qi_ref, ki_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
    dq_ref, *, scale, block_q, block_k, contiguous,
):  # fmt: skip
    start_q = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    q_idx, q_seg = qi_ref[...], qs_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(start_k, dq):
        ks = pl.ds(start_k * block_k, block_k)
        k = k_ref[ks, :]
        s = _masked_logits(q, k, q_idx, ki_ref[ks], q_seg, ks_ref[ks], scale)
        p = jnp.exp2(s - lse[:, None])
        dp = plgpu.dot(do, v_ref[ks, :].T) - delta[:, None]
        ds = p * dp * scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    k_len = k_ref.shape[0]
    if contiguous:
        upper = lax.div(block_q * (start_q + 1) + block_k - 1, block_k)
    else:
        upper = k_len // block_k
    dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _check(q, k, v, block_q, block_k, interpret: bool):
    _, tq, heads, d = q.shape
    _, tk, kv_heads, _ = k.shape
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != d:
        raise ValueError(f"flash attention: q {q.shape}, k {k.shape}, v {v.shape} do not match")
    if heads % kv_heads:
        raise ValueError(f"flash attention: {heads} query heads over {kv_heads} K/V heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"flash attention: head_dim {d} must be a power of two >= 16")
    for name, length, tile in (("query", tq, block_q), ("key", tk, block_k)):
        # Triton's dots want power-of-two tiles of at least 16; the interpreter does not.
        if length % tile or (not interpret and (tile < 16 or tile & (tile - 1))):
            raise ValueError(
                f"flash attention: {name} length {length} must be a multiple of the tile "
                f"{tile}, a power of two >= 16 (execution.attention_block)"
            )


def _specs(q, k, block_q, block_k, *, grid_over: str):
    """BlockSpecs of (q, k, v, q_index, k_index, q_segments, k_segments) for a grid of
    (row, head, block) or (block, row, head)."""
    tq, tk = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    d = q.shape[-1]
    if grid_over == "q":  # forward: grid (q block, row, head), one q block per program
        return [
            pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((block_q,), lambda i, b, h: (i,)),
            pl.BlockSpec((tk,), lambda i, b, h: (0,)),
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, tk), lambda i, b, h: (b, 0)),
        ]
    # backward: grid (row, head, block), whole rows in; the kernel slices its block
    return [
        pl.BlockSpec((None, tq, None, d), lambda b, h, i: (b, 0, h, 0)),
        pl.BlockSpec((None, tk, None, d), lambda b, h, i: (b, 0, h // group, 0)),
        pl.BlockSpec((None, tk, None, d), lambda b, h, i: (b, 0, h // group, 0)),
        pl.BlockSpec((tq,), lambda b, h, i: (0,)),
        pl.BlockSpec((tk,), lambda b, h, i: (0,)),
        pl.BlockSpec((None, tq), lambda b, h, i: (b, 0)),
        pl.BlockSpec((None, tk), lambda b, h, i: (b, 0)),
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_index: jax.Array,
    k_index: jax.Array,
    q_segments: jax.Array,
    k_segments: jax.Array,
    block: int = 128,
    contiguous: bool = False,
    interpret: bool = False,
    num_warps: int | None = None,
) -> jax.Array:
    """softmax(q·kᵀ/√d, masked) · v for q [batch, tq, heads, d], k/v [batch, tk, kv_heads, d];
    q_index [tq], k_index [tk]: each token's index in its row; q_segments [batch, tq],
    k_segments [batch, tk]. `block`: the query and key tile (capped at the lengths).
    `contiguous`: the indices are 0..T-1 (enables causal block skipping)."""
    return _forward(q, k, v, q_index, k_index, q_segments, k_segments, block, contiguous,
                    interpret, num_warps)[0]  # fmt: skip


def _forward(q, k, v, q_index, k_index, q_segments, k_segments, block, contiguous, interpret,
             num_warps):  # fmt: skip
    batch, tq, heads, d = q.shape
    tk = k.shape[1]
    block_q, block_k = min(block, tq), min(block, tk)
    _check(q, k, v, block_q, block_k, interpret)
    kernel = functools.partial(
        _forward_kernel, scale=d**-0.5, block_q=block_q, block_k=block_k, contiguous=contiguous
    )
    args = (q, k, v, q_index, k_index, q_segments, k_segments)
    out, lse = pl.pallas_call(
        kernel,
        grid=(tq // block_q, batch, heads),
        in_specs=_specs(q, k, block_q, block_k, grid_over="q"),
        out_specs=[
            pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[q, jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)],
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (4 if d <= 64 else 8), num_stages=2
        ),
        interpret=interpret,
        name="flash_attention_forward",
    )(*args)
    return out, (q, k, v, q_index, k_index, q_segments, k_segments, out, lse)


def _backward(block, contiguous, interpret, num_warps, residuals, do):
    q, k, v, q_index, k_index, q_segments, k_segments, out, lse = residuals
    batch, tq, heads, d = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    block_q, block_k = min(block, tq), min(block, tk)
    # delta_i = rowsum(dO ∘ O), the softmax backward's correction (cheap: XLA does it)
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
    args = (q, k, v, q_index, k_index, q_segments, k_segments, do, lse, delta)
    common = dict(scale=d**-0.5, block_q=block_q, block_k=block_k, contiguous=contiguous)
    in_specs = [
        *_specs(q, k, block_q, block_k, grid_over="k"),
        pl.BlockSpec((None, tq, None, d), lambda b, h, i: (b, 0, h, 0)),  # dO
        pl.BlockSpec((None, None, tq), lambda b, h, i: (b, h, 0)),  # lse
        pl.BlockSpec((None, None, tq), lambda b, h, i: (b, h, 0)),  # delta
    ]
    params = plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=2)
    # dK, dV per query head (each reads its group's K/V head); summed over groups below
    per_head = jax.ShapeDtypeStruct((batch, tk, heads, d), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, **common),
        grid=(batch, heads, tk // block_k),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, block_k, None, d), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, block_k, None, d), lambda b, h, i: (b, i, h, 0)),
        ],
        out_shape=[per_head, per_head],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkdv",
    )(*args)
    dq_specs = list(in_specs)
    dq_specs[0] = pl.BlockSpec((None, block_q, None, d), lambda b, h, i: (b, i, h, 0))
    dq_specs[3] = pl.BlockSpec((block_q,), lambda b, h, i: (i,))
    dq_specs[5] = pl.BlockSpec((None, block_q), lambda b, h, i: (b, i))
    dq_specs[7] = pl.BlockSpec((None, block_q, None, d), lambda b, h, i: (b, i, h, 0))
    dq_specs[8] = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    dq_specs[9] = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(batch, heads, tq // block_q),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, block_q, None, d), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(*args)
    group = heads // kv_heads

    def per_kv_head(x):
        return x.reshape(batch, tk, kv_heads, group, d).sum(axis=3).astype(k.dtype)

    return dq, per_kv_head(dk), per_kv_head(dv), None, None, None, None


flash_attention.defvjp(_forward, _backward)
