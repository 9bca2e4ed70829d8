"""SiLU-gated feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from infir2_jax.fp8.base import Gemm
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.layers import MLP_INNER, Linear, project, project_mlp, projection_options
from infir2_jax.parallel.rules import constrain


class MLP(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, gemm: Gemm, fp8_switch: jax.Array | None
    ):
        dims = projection_options(cfg, rngs, gemm, fp8_switch)
        d, f = cfg.hidden_size, cfg.intermediate_size
        # Megatron layout: gate/up column-parallel, down row-parallel.
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **dims)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **dims)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **dims)

    def __call__(self, x: jax.Array) -> jax.Array:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if self.down_proj.gemm.fuses_mlp:  # the block in one FP8 call (blockwise: fp8/dots.py)
            return constrain(project_mlp(x, projections), ("batch", "seq", None))
        gate, up = (constrain(y, MLP_INNER) for y in project(x, (self.gate_proj, self.up_proj)))
        return constrain(self.down_proj(swiglu(gate, up)), ("batch", "seq", None))


@jax.checkpoint
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) · up, recomputed in the backward pass: only gate and up are kept for it,
    not silu's three [tokens, ffn] intermediates. (The blockwise MLP computes SwiGLU inside
    its quantizer kernels, in the form `infir2_jax.kernels.swiglu` defines: FP32, rounded
    once. Here XLA fuses this form better into the per-tensor recipes' amax passes: the FP32
    form projects `current` 2 % slower at 1.5B 8k on an H100, BENCHMARKS.md.)"""
    return jax.nn.silu(gate) * up
