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
    k: jax.Array  # [layers, slots, length, kv_heads, head_dim], rotated keys
    v: jax.Array  # [layers, slots, length, kv_heads, head_dim]

    # Slots follow the batch (data-parallel replicas), kv heads the tensor-parallel split of
    # the k/v projections, so each device holds the cache of its own heads and rows.
    AXES = (None, "batch", None, "act_kv_heads", None)

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, length: int) -> KVCache:
        shape = (cfg.num_layers, slots, length, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(constrain(zeros, cls.AXES), constrain(zeros, cls.AXES))

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def insert(self, k: jax.Array, v: jax.Array, sources: jax.Array, targets: jax.Array) -> KVCache:
        """Writes prefilled prompts into slots: k/v [layers, rows, prompt, kv_heads,
        head_dim]; slot `targets[i]` gets row `sources[i]` at positions [0, prompt). A
        target >= `slots` is dropped (batch padding). One row can fill several slots (the
        `n` samples of one prompt share its prefill)."""
        prompt = k.shape[2]

        def put(cache, new):
            rows = jnp.take(new, sources, axis=1).astype(cache.dtype)
            return constrain(cache.at[:, targets, :prompt].set(rows, mode="drop"), self.AXES)

        return KVCache(put(self.k, k), put(self.v, v))

    def write(self, layer: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """One new token per slot: k/v [slots, kv_heads, head_dim] at `positions` [slots]
        of `layer` (a position beyond the cache is dropped)."""
        rows = jnp.arange(self.slots)

        def put(cache, new):
            updated = cache.at[layer, rows, positions].set(new.astype(cache.dtype), mode="drop")
            return constrain(updated, self.AXES)

        return KVCache(put(self.k, k), put(self.v, v))

    def attend(self, layer: jax.Array, q: jax.Array, positions: jax.Array) -> jax.Array:
        """q [slots, 1, heads, head_dim] (the token at `positions`) over the slot's cached
        positions 0..position of `layer`; kv heads broadcast over their query group, softmax
        in FP32 (jax.nn.dot_product_attention, as training's XLA attention)."""
        keys, values = self.k[layer], self.v[layer]  # [slots, length, kv_heads, head_dim]
        visible = jnp.arange(self.length)[None, :] <= positions[:, None]  # [slots, length]
        return jax.nn.dot_product_attention(q, keys, values, mask=visible[:, None, None, :])
