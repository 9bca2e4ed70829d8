"""`from_pretrained`: a ready model from an HF directory or an Orbax checkpoint."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import traverse_util
from jax.typing import DTypeLike

from infir2_jax.checkpoint import read_hf_config, read_hf_params, read_model_config, restore_params
from infir2_jax.checkpoint.hf_mapping import ParamPath
from infir2_jax.model import ExecutionConfig, ModelConfig, Qwen2
from infir2_jax.model.execution import ExecutionPlan, resolve_plan
from infir2_jax.model.parts import split_model


def model_from_params(
    cfg: ModelConfig, params: Mapping[ParamPath, Any], plan: ExecutionPlan | None = None
) -> Qwen2:
    """Builds the module around existing parameter arrays (no random init is run); `plan`
    defaults to one device of this process, BF16."""
    tree = traverse_util.unflatten_dict(
        {k: jnp.asarray(v, jnp.dtype(cfg.param_dtype)) for k, v in params.items()}
    )
    return split_model(cfg, resolve_plan(cfg) if plan is None else plan).bind(tree)


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of an HF directory or an Orbax checkpoint / run directory."""
    path = Path(path)
    return read_hf_config(path) if _is_hf_dir(path) else read_model_config(path)


def load_params(path: str | os.PathLike, cfg: ModelConfig) -> Mapping[ParamPath, Any]:
    """Flat parameters from an HF directory or Orbax checkpoint, checked against `cfg` and
    stored in `cfg.param_dtype`."""
    path = Path(path)
    if _is_hf_dir(path):
        return read_hf_params(path, cfg, dtype=cfg.param_dtype)
    return restore_params(path, cfg, dtype=cfg.param_dtype)


def dtype_name(dtype: DTypeLike) -> str:
    """The name ("float32", "bfloat16", ...) of a dtype given as a name or any dtype-like."""
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype {dtype!r}: not a dtype (e.g. 'bfloat16', jnp.float32)") from None


def from_pretrained(
    path: str | os.PathLike, dtype: DTypeLike = "bfloat16", **config_overrides: Any
) -> Qwen2:
    """Loads `path` (an HF Qwen2 directory with config.json + safetensors, or an Orbax
    checkpoint / run directory) into a model computing and storing weights in `dtype`:
    float32, bfloat16 or float16, as a name or any dtype-like (`jnp.float32`, `np.float32`,
    `jnp.dtype("bfloat16")`).

    Returns `m` with `m(input_ids) -> logits` [batch, seq, vocab]. `config_overrides` replace
    ModelConfig fields (e.g. `rope_theta=...`) or ExecutionConfig fields (e.g. `remat="none"`,
    `attention_impl="cudnn"`).
    """
    execution_fields = {f.name for f in dataclasses.fields(ExecutionConfig)}
    execution = {k: v for k, v in config_overrides.items() if k in execution_fields}
    model = {k: v for k, v in config_overrides.items() if k not in execution_fields}
    name = dtype_name(dtype)
    cfg = read_config(path).replace(dtype=name, param_dtype=name, **model)
    plan = resolve_plan(cfg, ExecutionConfig(**execution))
    return model_from_params(cfg, load_params(path, cfg), plan)
