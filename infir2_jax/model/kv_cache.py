"""The KV cache of autoregressive decoding: every layer's keys and values per slot.

A slot is one sequence being generated (a row of the decode batch). Shapes are static: a
cache is created once per (slots, length) and rows are rewritten in place, so decoding
compiles once per bucket, never per token. Positions past a slot's current length hold stale
values that the mask below never lets a query see.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from infir2_jax.model.config import ModelConfig
from infir2_jax.parallel.rules import constrain


class KVCache(NamedTuple):
    k: jax.Array  # [layers, slots, kv_heads, length, head_dim], rotated keys
    v: jax.Array  # [layers, slots, kv_heads, length, head_dim]

    # Slots follow the batch (data-parallel replicas), kv heads the tensor-parallel split of
    # the k/v projections, so each device holds the cache of its own heads and rows. (slot,
    # kv head) major, [length, head_dim] minor is the layout of a batched GEMM: with the
    # length ahead of the heads, XLA:GPU transposed the whole cache into and out of every
    # decode loop (a second cache-sized buffer).
    AXES = (None, "batch", "act_kv_heads", None, None)

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, length: int) -> KVCache:
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, length, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(constrain(zeros, cls.AXES), constrain(zeros, cls.AXES))

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def insert(self, k: jax.Array, v: jax.Array, sources: jax.Array, targets: jax.Array) -> KVCache:
        """Writes prefilled prompts into slots: k/v [layers, rows, prompt, kv_heads,
        head_dim]; slot `targets[i]` gets row `sources[i]` at positions [0, prompt). A
        target >= `slots` is dropped (batch padding). One row can fill several slots (the
        `n` samples of one prompt share its prefill)."""
        prompt = k.shape[2]

        def put(cache, new):
            rows = _finite(jnp.take(new, sources, axis=1).swapaxes(2, 3).astype(cache.dtype))
            updated = cache.at[:, targets, :, :prompt].set(rows, mode="drop")
            return constrain(updated, self.AXES)

        return KVCache(put(self.k, k), put(self.v, v))

    def append(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """One new token per slot for every layer: k/v [layers, slots, kv_heads, head_dim]
        at `positions` [slots] (a position beyond the cache is dropped). One scatter after
        the layer scan, so the cache is updated in place and never copied."""
        rows = jnp.arange(self.slots)

        def put(cache, new):
            # Indices split by a slice put their dimension first: new as [slots, layers, ...].
            new = _finite(new.swapaxes(0, 1).astype(cache.dtype))
            updated = cache.at[:, rows, :, positions].set(new, mode="drop")
            return constrain(updated, self.AXES)

        return KVCache(put(self.k, k), put(self.v, v))


def _finite(x: jax.Array) -> jax.Array:
    """Non-finite entries as 0: a sample that produced them is broken anyway, but what it
    leaves in its slot must not poison the next sample there (0 · NaN = NaN)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cached_k: jax.Array,
    cached_v: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """Attention of one new token per slot: q [slots, 1, heads, head_dim] over the slot's
    cached positions < `positions` (cached_k/v [slots, kv_heads, length, head_dim], one
    layer's cache, read only) and over its own k/v [slots, 1, kv_heads, head_dim], which are
    not in the cache yet. Two score blocks and one FP32 softmax across both: the cache stays
    out of the layer scan's carry (read only), and one scatter after the scan appends every
    layer's new k/v in place (`KVCache.append`). KV heads broadcast over their query group.

    The two products are multiply-and-sum, not dots: one query token per slot makes them
    matrix-vector products, bound by reading the cache, and as reductions XLA fuses the
    layer's dynamic slice of the cache into them. As dots, XLA:GPU first copied the layer's
    K and V out of the cache on every step (tests/test_gpu_compile.py checks that the
    compiled decode loop holds no buffer that grows with the cache)."""
    slots, _, heads, dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(slots, kv_heads, heads // kv_heads, dim)  # [slots, kv, group, dim]
    scale = dim**-0.5
    f32 = jnp.float32
    cached = jnp.sum(qg[:, :, :, None, :].astype(f32) * cached_k[:, :, None].astype(f32), -1)
    cached = cached * scale
    visible = jnp.arange(cached_k.shape[2])[None, :] < positions[:, None]  # [slots, length]
    cached = jnp.where(visible[:, None, None, :], cached, -jnp.inf)
    own = jnp.einsum("skgd,skd->skg", qg, k[:, 0], preferred_element_type=f32) * scale
    top = jnp.maximum(jnp.max(cached, axis=-1), own)  # finite: own is always visible
    p_cached, p_own = jnp.exp(cached - top[..., None]), jnp.exp(own - top)
    total = jnp.sum(p_cached, axis=-1) + p_own
    # Masked positions weigh exactly 0; the cache holds only finite values (`_finite`), so a
    # stale entry adds nothing. (Masking the values here as well broke the fusion: XLA:GPU
    # then copied each layer's V out of the cache every step.)
    out = jnp.sum(p_cached[..., None] * cached_v[:, :, None].astype(f32), axis=3)
    out = (out + p_own[..., None] * v[:, 0, :, None, :].astype(f32)) / total[..., None]
    return out.reshape(slots, 1, heads, dim).astype(q.dtype)
