"""Grouped-query self-attention with qkv bias, RoPE and packed-sequence (segment) masking."""

from __future__ import annotations

import jax
from flax import nnx

from infir2_jax.fp8.recipes import Gemm
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.layers import Linear, projection_options
from infir2_jax.model.rope import apply_rope


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, 1, q, k] boolean: a token sees only tokens of its own packed document.

    Causality is added separately (`is_causal`); together they keep packed documents apart.
    """
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, gemm: Gemm):
        dims = projection_options(cfg, rngs, gemm)
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, q_width, axes=("embed", "heads"), use_bias=True, **dims)
        self.k_proj = Linear(d, kv_width, axes=("embed", "kv_heads"), use_bias=True, **dims)
        self.v_proj = Linear(d, kv_width, axes=("embed", "kv_heads"), use_bias=True, **dims)
        self.o_proj = Linear(q_width, d, axes=("heads", "embed"), **dims)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.implementation = cfg.attention_impl

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        segment_ids: jax.Array,
        fp8_enabled: jax.Array | None = None,
    ) -> jax.Array:
        batch, seq, _ = x.shape
        q = self.q_proj(x, fp8_enabled).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x, fp8_enabled).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, fp8_enabled).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # [batch, seq, heads, head_dim]; JAX broadcasts the kv heads over their query group and
        # runs the softmax in FP32.
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=segment_mask(segment_ids),
            is_causal=True,
            implementation=self.implementation,
        )
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim), fp8_enabled)
