"""HF <-> Orbax conversion (the library side of converters/*.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

from infir2_jax.checkpoint.hf_io import (
    CheckpointError,
    hf_weight_map,
    read_hf_config,
    read_hf_params,
    write_hf_checkpoint,
)
from infir2_jax.checkpoint.orbax_io import (
    read_model_config,
    restore_params,
    save_model_checkpoint,
    stored_param_dtype,
)

_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def stored_hf_dtype(hf_dir: str | os.PathLike) -> np.dtype:
    """The dtype the HF checkpoint stores its embedding in (its weights' dtype)."""
    name = "model.embed_tokens.weight"
    file = hf_weight_map(hf_dir).get(name)
    if file is None:
        raise FileNotFoundError(f"{hf_dir}: no tensor {name}")
    with safe_open(file, framework="numpy") as f:
        stored = f.get_slice(name).get_dtype()
    if stored not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"{file}: {name} is stored as {stored}; expected one of {list(_SAFETENSORS_DTYPES)}"
        )
    return np.dtype(_SAFETENSORS_DTYPES[stored])


def hf_to_orbax(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto") -> Path:
    """HF directory -> Orbax model checkpoint. Peak host memory: the parameters once in
    `dtype` ("auto": as stored in the HF files) plus the largest tensor."""
    cfg = read_hf_config(hf_dir)
    np_dtype = stored_hf_dtype(hf_dir) if dtype == "auto" else np.dtype(dtype)
    if Path(out).exists():  # fail before reading the weights, not after
        raise FileExistsError(f"{out}: already exists; refusing to overwrite")
    params = read_hf_params(hf_dir, cfg, dtype=np_dtype)
    return save_model_checkpoint(out, params, cfg)


def orbax_to_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    copy_files_from: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Orbax model or training checkpoint -> HF directory with weights in `dtype` ("auto": as
    stored; training checkpoints store FP32 master weights). Peak host memory: the stored
    parameters once plus one output shard."""
    cfg = read_model_config(checkpoint)
    if dtype == "auto":
        dtype = stored_param_dtype(checkpoint)
        if dtype == "mixed":
            raise CheckpointError(f"{checkpoint}: parameters of several dtypes; choose a --dtype")
    params = restore_params(checkpoint, cfg)
    return write_hf_checkpoint(
        params,
        cfg,
        out,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        copy_files_from=copy_files_from,
    )
