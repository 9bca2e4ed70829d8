"""Checkpoint formats: the HF name-mapping table, HF safetensors I/O, Orbax model checkpoints."""

from infir2_jax._lazy import lazy_exports

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
_HF_IO = ("read_hf_config", "read_hf_params", "write_hf_checkpoint")
_MAPPING = ("RULES", "TensorRule", "param_shapes")
# Imported on first use: the converter commands' `--help` loads no JAX.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CheckpointError": "infir2_jax.errors",
        **dict.fromkeys(_HF_IO, "infir2_jax.checkpoint.hf_io"),
        **dict.fromkeys(_MAPPING, "infir2_jax.checkpoint.hf_mapping"),
        **dict.fromkeys(
            [
                "read_model_config",
                "resolve_checkpoint_dir",
                "restore_params",
                "save_model_checkpoint",
            ],
            "infir2_jax.checkpoint.orbax_io",
        ),
    },
)
