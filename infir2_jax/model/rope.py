"""Rotary position embedding in HF's rotate-half layout (not the interleaved one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, dtype: jnp.dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """cos and sin, [batch, seq, head_dim] for integer `positions` [batch, seq]: computed in
    FP32, then cast to `dtype` (HF casts them to the activations' dtype; casting once, outside
    the layer scan, keeps per-layer copies out of the backward pass's saved values)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim] (cast to x's dtype)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin
