"""infir2-jax: InfiR2's FP8 training recipe for Qwen2.5 on JAX/Flax."""

import os

from infir2_jax._lazy import lazy_exports

# We use transformers for tokenizers and configs only; without PyTorch (a GPU install) it would
# advise on every start that "PyTorch was not found".
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_MODEL = "infir2_jax.model"
_PRETRAINED = "infir2_jax.pretrained"
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
# Imported on first use: a command's `--help` loads no JAX.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {n: _PRETRAINED if n in ("from_pretrained", "model_from_params") else _MODEL for n in __all__},
)
