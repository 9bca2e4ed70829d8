"""Qwen2.5 in Flax NNX."""

from infir2_jax._lazy import lazy_exports

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
_CONFIG = ("PRESETS", "ExecutionConfig", "ModelConfig", "from_hf_config", "preset", "to_hf_config")
# Imported on first use: reading a config (model/config.py) loads no JAX.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(_CONFIG, "infir2_jax.model.config"),
        **dict.fromkeys(["ExecutionPlan", "resolve_plan"], "infir2_jax.model.execution"),
        "chunked_cross_entropy": "infir2_jax.model.loss",
        **dict.fromkeys(["DecoderLayer", "Qwen2"], "infir2_jax.model.transformer"),
    },
)
