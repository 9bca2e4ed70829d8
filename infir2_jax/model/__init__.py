"""Qwen2.5 in Flax NNX."""

from infir2_jax.model.config import (
    PRESETS,
    ExecutionConfig,
    ModelConfig,
    from_hf_config,
    preset,
    to_hf_config,
)
from infir2_jax.model.execution import ExecutionPlan, resolve_plan
from infir2_jax.model.loss import chunked_cross_entropy
from infir2_jax.model.transformer import DecoderLayer, Qwen2

__all__ = [
    "PRESETS",
    "DecoderLayer",
    "ExecutionConfig",
    "ExecutionPlan",
    "ModelConfig",
    "Qwen2",
    "chunked_cross_entropy",
    "from_hf_config",
    "preset",
    "resolve_plan",
    "to_hf_config",
]
