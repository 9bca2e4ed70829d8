"""Basic layers: Linear (with an injectable dot_general), Embedding, RMSNorm.

Every parameter carries logical axis names (`out_sharding` metadata); mapping them to mesh
axes is the job of a rules table outside the model, so model code never names a mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from infir2_jax.model.config import ModelConfig

# `lax.dot_general` or a drop-in replacement (an FP8 recipe injects its own).
DotGeneral = Callable[..., jax.Array]
Axes = tuple[str, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A parameter annotated with logical axis names; sharding is applied later by rules."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def projection_options(cfg: ModelConfig, rngs: nnx.Rngs, dot_general: DotGeneral) -> dict:
    """The Linear keyword arguments every projection of a decoder layer shares."""
    return dict(
        init_std=cfg.init_std,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
        dot_general=dot_general,
    )


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel is [in, out] (HF's `weight` transposed)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool = False,
        init_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        dot_general: DotGeneral = jax.lax.dot_general,
    ):
        init = jax.nn.initializers.normal(init_std)
        self.kernel = param(init(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None
        self.dtype = dtype
        self.dot_general = dot_general

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        contract = (((x.ndim - 1,), (0,)), ((), ()))
        y = self.dot_general(x, self.kernel[...].astype(self.dtype), contract)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embedding(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` is the tied lm_head (h @ tableᵀ)."""

    def __init__(
        self,
        vocab_size: int,
        features: int,
        *,
        init_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(init_std)
        table = init(rngs.params(), (vocab_size, features), param_dtype)
        self.embedding = param(table, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """HF Qwen2RMSNorm: statistics in FP32, the scale applied in the compute dtype."""

    def __init__(self, features: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.scale = param(jnp.ones((features,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed
