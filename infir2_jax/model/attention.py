"""Grouped-query self-attention with qkv bias, RoPE and packed-sequence (segment) masking."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from infir2_jax.model.attention_impl import FLASH, checks_varying_axes, flash
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.execution import ExecutionPlan
from infir2_jax.model.kv_cache import decode_attention
from infir2_jax.model.layers import Linear, project, projection_options
from infir2_jax.model.rope import apply_rope
from infir2_jax.parallel.context import context_parallel_attention
from infir2_jax.parallel.rules import Layout, constrain


def attention_mask(
    q_index: jax.Array, k_index: jax.Array, q_segments: jax.Array, k_segments: jax.Array
) -> jax.Array:
    """[batch, 1, q, k] boolean: causal by original token index, and within one packed
    document (segment). Indices rather than `is_causal` so a permuted (load-balanced) or
    partial query block masks exactly like the whole row."""
    causal = q_index[:, None] >= k_index[None, :]
    same_document = q_segments[:, :, None] == k_segments[:, None, :]
    return (causal[None] & same_document)[:, None]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_index: jax.Array,
    k_index: jax.Array,
    q_segments: jax.Array,
    k_segments: jax.Array,
    *,
    implementation: str | None,
    chunk_size: int,
    max_segments: int = 32,
    block: int = 128,
    context_parallel: bool = False,
    layout: Layout | None = None,
    compiled: bool = False,
) -> jax.Array:
    """Masked attention, q [batch, q, heads, dim] over k/v [batch, k, kv_heads, dim].

    `implementation` is a resolved `execution.attention_impl` (model/attention_impl.py):
    `"cudnn"` / `"pallas"` run flash attention (no [q, k] buffer); `"chunked"` processes
    `chunk_size` queries at a time under remat, so only [chunk, k] scores exist at once
    (forward and backward) instead of [q, k]: the pure-XLA way to run 32k-token rows on any
    platform; otherwise one `jax.nn.dot_product_attention` call (JAX broadcasts kv heads over
    their query group and runs the softmax in FP32).
    """
    if implementation in FLASH:
        return flash(
            implementation, q, k, v, q_index, k_index, q_segments, k_segments, layout=layout,
            compiled=compiled, context_parallel=context_parallel, max_segments=max_segments,
            block=block,
        )  # fmt: skip

    def block(q_blk, q_idx, q_seg):
        mask = attention_mask(q_idx, k_index, q_seg, k_segments)
        impl = "xla" if implementation == "chunked" else implementation
        return jax.nn.dot_product_attention(q_blk, k, v, mask=mask, implementation=impl)

    length = q.shape[1]
    if implementation != "chunked" or length <= chunk_size:
        return block(q, q_index, q_segments)
    if length % chunk_size:
        raise ValueError(
            f"execution.attention_chunk_size={chunk_size} must divide the per-device query "
            f"length {length}"
        )
    n = length // chunk_size

    def split(x, axis):  # [.., n·c, ..] -> [n, .., c, ..]
        return jnp.moveaxis(
            x.reshape(*x.shape[:axis], n, chunk_size, *x.shape[axis + 1 :]), axis, 0
        )

    blocks = (split(q, 1), split(q_index, 0), split(q_segments, 1))
    out = jax.lax.map(lambda xs: jax.checkpoint(block)(*xs), blocks)  # [n, batch, c, heads, dim]
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        plan: ExecutionPlan,
        fp8_switch: jax.Array | None = None,
    ):
        dims = projection_options(cfg, rngs, plan.gemm, fp8_switch)
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        d = cfg.hidden_size
        # Megatron layout: q/k/v column-parallel (output split over heads), o row-parallel.
        self.q_proj = Linear(d, q_width, axes=("embed", "heads"), use_bias=True, **dims)
        self.k_proj = Linear(d, kv_width, axes=("embed", "kv_heads"), use_bias=True, **dims)
        self.v_proj = Linear(d, kv_width, axes=("embed", "kv_heads"), use_bias=True, **dims)
        self.o_proj = Linear(q_width, d, axes=("heads", "embed"), **dims)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.plan = plan

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        token_index: jax.Array,
        segment_ids: jax.Array,
    ) -> jax.Array:
        """x [batch, seq, embed]; token_index [seq]: each position's index in the original
        row (a permutation under context parallelism); segment_ids [batch, seq]."""
        return self.forward(x, rope, token_index, segment_ids)[0]

    def forward(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        token_index: jax.Array,
        segment_ids: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(output, k, v): `__call__` plus the rotated keys and the values [batch, seq,
        kv_heads, head_dim] (what a prefill writes into the KV cache)."""
        q, k, v = self.qkv(x, rope)
        plan = self.plan
        context_parallel = plan.context > 1
        local = functools.partial(
            attend,
            implementation=plan.attention,
            chunk_size=plan.execution.attention_chunk_size,
            max_segments=plan.execution.max_segments,
            block=plan.execution.attention_block,
            context_parallel=context_parallel,
            layout=plan.layout,
            compiled=plan.target.is_cuda,
        )
        if context_parallel:
            out = context_parallel_attention(
                plan.layout, local, q, k, v, token_index, segment_ids,
                check_vma=checks_varying_axes(plan.attention),
            )  # fmt: skip
        else:
            out = local(q, k, v, token_index, token_index, segment_ids, segment_ids)
        return self.output(out), k, v

    def decode(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        cached_k: jax.Array,
        cached_v: jax.Array,
        positions: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One new token per slot, x [slots, 1, embed] at `positions` [slots], attending to
        this layer's cache (cached_k/v [slots, kv_heads, length, head_dim]) and to itself.
        Returns (output, k, v): the caller appends k/v [slots, 1, kv_heads, head_dim] to the
        cache (`KVCache.append`)."""
        q, k, v = self.qkv(x, rope)
        out = decode_attention(q, k, v, cached_k, cached_v, positions)
        return self.output(out), k, v

    def qkv(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projected heads, RoPE applied to q and k: q [batch, seq, heads, head_dim], k and v
        [batch, seq, kv_heads, head_dim]."""
        batch, seq, _ = x.shape

        def heads(y: jax.Array, count: int, axis: str) -> jax.Array:
            y = y.reshape(batch, seq, count, self.head_dim)
            return constrain(y, ("batch", "inner_seq", axis, None))

        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = heads(q, self.num_heads, "act_heads")
        k = heads(k, self.num_kv_heads, "act_kv_heads")
        v = heads(v, self.num_kv_heads, "act_kv_heads")
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def output(self, out: jax.Array) -> jax.Array:
        """o_proj of the attention output [batch, seq, heads, head_dim] -> [batch, seq, embed]."""
        batch, seq = out.shape[:2]
        out = constrain(out, ("batch", "inner_seq", "act_heads", None))
        y = self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))
        return constrain(y, ("batch", "seq", None))
