"""Checkpoint formats: the HF name-mapping table, HF safetensors I/O, Orbax model checkpoints."""

from infir2_jax.checkpoint.hf_io import (
    CheckpointError,
    read_hf_config,
    read_hf_params,
    write_hf_checkpoint,
)
from infir2_jax.checkpoint.hf_mapping import RULES, TensorRule, param_shapes
from infir2_jax.checkpoint.orbax_io import (
    read_model_config,
    resolve_checkpoint_dir,
    restore_params,
    save_model_checkpoint,
)

__all__ = [
    "RULES",
    "CheckpointError",
    "TensorRule",
    "param_shapes",
    "read_hf_config",
    "read_hf_params",
    "read_model_config",
    "resolve_checkpoint_dir",
    "restore_params",
    "save_model_checkpoint",
    "write_hf_checkpoint",
]
