"""SiLU-gated feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from infir2_jax.fp8.recipes import Gemm
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.layers import Linear, projection_options


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, gemm: Gemm):
        dims = projection_options(cfg, rngs, gemm)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **dims)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **dims)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **dims)

    def __call__(self, x: jax.Array, fp8_enabled: jax.Array | None = None) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x, fp8_enabled)) * self.up_proj(x, fp8_enabled)
        return self.down_proj(hidden, fp8_enabled)
