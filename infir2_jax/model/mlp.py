"""SiLU-gated feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from infir2_jax.fp8.recipes import Gemm
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.layers import Linear, projection_options
from infir2_jax.parallel.rules import constrain


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, gemm: Gemm):
        dims = projection_options(cfg, rngs, gemm)
        d, f = cfg.hidden_size, cfg.intermediate_size
        # Megatron layout: gate/up column-parallel, down row-parallel.
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **dims)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **dims)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **dims)

    def __call__(self, x: jax.Array, fp8_enabled: jax.Array | None = None) -> jax.Array:
        inner = ("batch", "inner_seq", "act_mlp")
        gate = constrain(self.gate_proj(x, fp8_enabled), inner)
        up = constrain(self.up_proj(x, fp8_enabled), inner)
        return constrain(
            self.down_proj(jax.nn.silu(gate) * up, fp8_enabled), ("batch", "seq", None)
        )
