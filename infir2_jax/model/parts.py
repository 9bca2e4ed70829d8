"""The model split by role for jitted functions: structure, parameters, FP8 state, probes.

Training, generation and evaluation all hold a model as `ModelParts` plus arrays, and
rebuild the module inside a traced function with `parts.bind(params, ...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from infir2_jax.fp8 import Fp8Probe, Fp8State, Gemm
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.transformer import Qwen2

Params = dict[str, Any]  # nested dict of FP32 master weights, as `nnx.to_pure_dict` gives


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The model split by role: structure, parameters, FP8 state, FP8 probes."""

    graphdef: nnx.GraphDef
    params: Params  # abstract (ShapeDtypeStruct leaves)
    fp8: dict[str, Any]
    probes: dict[str, Any]
    param_axes: dict[str, Any]  # like `params`, leaves: logical axis names (tuples)
    gemm: Gemm  # the FP8 recipe, which updates `fp8` once per step

    def bind(self, params: Params, fp8: dict | None = None, probes: dict | None = None) -> Qwen2:
        """The module with these arrays (inside a traced function); FP8 state and probes
        default to the abstract ones, which a BF16 model does not have."""
        fp8 = self.fp8 if fp8 is None else fp8
        probes = self.probes if probes is None else probes
        return nnx.merge(self.graphdef, params, fp8, probes)


def split_model(cfg: ModelConfig, gemm: Gemm) -> ModelParts:
    """Abstract split of the model (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), gemm=gemm))
    graphdef, params, fp8, probes = nnx.split(abstract, nnx.Param, Fp8State, Fp8Probe)
    pure = [nnx.to_pure_dict(s) for s in (params, fp8, probes)]
    axes = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(params)))
    return ModelParts(graphdef, *pure, param_axes=axes, gemm=gemm)


def init_params(cfg: ModelConfig, seed: int, gemm: Gemm) -> tuple[Params, dict[str, Any]]:
    """Random parameters and the FP8 recipe's initial state."""
    model = Qwen2(cfg, rngs=nnx.Rngs(seed), gemm=gemm)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(
        nnx.state(model, Fp8State)
    )
