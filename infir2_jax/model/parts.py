"""The model split by role for jitted functions: structure, parameters, FP8 state, probes.

Training, generation and evaluation all hold a model as `ModelParts` plus arrays, and
rebuild the module inside a traced function with `parts.bind(params, ...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from infir2_jax.fp8 import Fp8Probe, Fp8State, Fp8Switch, Gemm
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.execution import ExecutionPlan
from infir2_jax.model.transformer import Qwen2

Params = dict[str, Any]  # nested dict of FP32 master weights, as `nnx.to_pure_dict` gives


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The model split by role: structure, parameters, FP8 state, FP8 probes, and the FP8
    switches of the projections (constants of the plan: never trained, never saved)."""

    graphdef: nnx.GraphDef
    params: Params  # abstract (ShapeDtypeStruct leaves)
    fp8: dict[str, Any]
    probes: dict[str, Any]
    param_axes: dict[str, Any]  # like `params`, leaves: logical axis names (tuples)
    plan: ExecutionPlan  # how the model runs; its FP8 recipe updates `fp8` once per step
    config: ModelConfig
    switches: dict[str, Any] = dataclasses.field(default_factory=dict)  # numpy bool leaves

    @property
    def gemm(self) -> Gemm:
        return self.plan.gemm

    def fallback(self) -> ModelParts:
        """These parts under the fallback plan (`ExecutionPlan.fallback`): the same arrays,
        the attention that takes batches the primary one cannot."""
        return split_model(self.config, self.plan.fallback())

    def bind(self, params: Params, fp8: dict | None = None, probes: dict | None = None) -> Qwen2:
        """The module with these arrays (inside a traced function); FP8 state and probes
        default to the abstract ones, which a BF16 model does not have."""
        fp8 = self.fp8 if fp8 is None else fp8
        probes = self.probes if probes is None else probes
        return nnx.merge(self.graphdef, params, fp8, probes, self.switches)


def split_model(cfg: ModelConfig, plan: ExecutionPlan) -> ModelParts:
    """Abstract split of the model (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), plan=plan))
    graphdef, params, fp8, probes, switches = nnx.split(
        abstract, nnx.Param, Fp8State, Fp8Probe, Fp8Switch
    )
    pure = [nnx.to_pure_dict(s) for s in (params, fp8, probes)]
    axes = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(params)))
    mask = plan.gemm.layer_mask(cfg.num_layers)
    # Every projection of the stack has the layer mask as its switch [layers].
    switches = jax.tree.map(lambda _: np.asarray(mask), nnx.to_pure_dict(switches))
    return ModelParts(graphdef, *pure, param_axes=axes, plan=plan, config=cfg, switches=switches)


def init_params(cfg: ModelConfig, seed: int, plan: ExecutionPlan) -> tuple[Params, dict[str, Any]]:
    """Random parameters and the FP8 recipe's initial state."""
    model = Qwen2(cfg, rngs=nnx.Rngs(seed), plan=plan)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(
        nnx.state(model, Fp8State)
    )
