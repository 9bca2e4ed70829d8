"""infir2-jax: InfiR2's FP8 training recipe for Qwen2.5 on JAX/Flax."""

import os

# We use transformers for tokenizers and configs only; without PyTorch (a GPU install) it would
# advise on every start that "PyTorch was not found".
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from infir2_jax.model import (
    PRESETS,
    ExecutionConfig,
    ExecutionPlan,
    ModelConfig,
    Qwen2,
    from_hf_config,
    preset,
    resolve_plan,
    to_hf_config,
)
from infir2_jax.pretrained import from_pretrained, model_from_params

__all__ = [
    "PRESETS",
    "ExecutionConfig",
    "ExecutionPlan",
    "ModelConfig",
    "Qwen2",
    "from_hf_config",
    "from_pretrained",
    "model_from_params",
    "preset",
    "resolve_plan",
    "to_hf_config",
]
