"""Orbax model checkpoints: a `params` item (nested dict of arrays) + a `model_config` item.

The same two items sit in every training checkpoint step (next to `opt_state` and `meta`), so
a converter output, a training step directory, a run's `checkpoints/` folder or the run
directory itself all load the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from infir2_jax.checkpoint.hf_io import CheckpointError
from infir2_jax.checkpoint.hf_mapping import ParamPath, param_shapes
from infir2_jax.model.config import ModelConfig, drop_execution_fields

PARAMS = "params"
MODEL_CONFIG = "model_config"


def _checkpointer() -> ocp.Checkpointer:
    # Handlers are named per item so metadata can be read from a checkpoint saved elsewhere.
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            **{PARAMS: ocp.StandardCheckpointHandler(), MODEL_CONFIG: ocp.JsonCheckpointHandler()}
        )
    )


def model_config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_config_from_json(d: dict[str, Any], where: str) -> ModelConfig:
    d = drop_execution_fields(d)  # saved before execution choices left the model config
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown model_config keys {unknown}")
    return ModelConfig(**d)


def save_model_checkpoint(
    path: str | os.PathLike, params: dict[ParamPath, Any], cfg: ModelConfig
) -> Path:
    """Writes host (numpy) params + model config; Orbax finalises the directory atomically.

    The arrays are written in place: Orbax's defensive copy of host arrays is turned off (we
    do not touch them during the save) and at most 1 GB is in flight, so saving adds almost
    nothing to the peak host memory of a conversion.
    """
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path}: already exists; refusing to overwrite")
    tree = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in params.items()})
    in_place = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        # Unused here, but Orbax warns at start-up when a registry lacks a jax.Array handler.
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    writer = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, type_handler_registry=in_place)
    handlers = {PARAMS: writer, MODEL_CONFIG: ocp.JsonCheckpointHandler()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as ckptr:
        ckptr.save(
            path,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.PyTreeSave(tree),
                    MODEL_CONFIG: ocp.args.JsonSave(model_config_to_json(cfg)),
                }
            ),
        )
    return path


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A step directory from: a step directory, a `checkpoints/` root, or a run directory.

    For a root (numbered step sub-directories) the latest finished step is chosen.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / PARAMS).is_dir() and (path / MODEL_CONFIG).is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if root.is_dir():
        steps = sorted(
            (int(p.name), p)
            for p in root.iterdir()
            if p.name.isdigit() and (p / PARAMS).is_dir() and (p / MODEL_CONFIG).is_dir()
        )
        if steps:
            return steps[-1][1]
    raise FileNotFoundError(
        f"{path}: not an Orbax model checkpoint (expected '{PARAMS}/' and '{MODEL_CONFIG}/' "
        "items, a checkpoints/ folder of numbered steps, or a run directory)"
    )


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    step_dir = resolve_checkpoint_dir(path)
    with _checkpointer() as ckptr:
        restored = ckptr.restore(
            step_dir, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()})
        )
    return model_config_from_json(restored[MODEL_CONFIG], str(step_dir / MODEL_CONFIG))


def stored_param_dtype(path: str | os.PathLike) -> str:
    """The dtype a checkpoint stores its parameters in ("float32" for training checkpoints,
    whose master weights are FP32); "mixed" if they differ."""
    tree = _params_metadata(resolve_checkpoint_dir(path))
    dtypes = {str(np.dtype(leaf.dtype)) for leaf in jax.tree.leaves(tree)}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def restore_params(
    path: str | os.PathLike, cfg: ModelConfig, dtype: str | None = None
) -> dict[ParamPath, jax.Array]:
    """Flat params from a checkpoint, every stored shape checked against `cfg` first."""
    step_dir = resolve_checkpoint_dir(path)
    expected = param_shapes(cfg)
    stored = traverse_util.flatten_dict(_params_metadata(step_dir))
    for key in sorted(set(expected) | set(stored)):
        name = "/".join(key)
        if key not in stored:
            raise CheckpointError(f"{step_dir}: parameter {name} is missing")
        if key not in expected:
            raise CheckpointError(f"{step_dir}: unexpected parameter {name}")
        if tuple(stored[key].shape) != expected[key]:
            raise CheckpointError(
                f"{step_dir}: parameter {name} has shape {tuple(stored[key].shape)}, "
                f"the model config expects {expected[key]}"
            )
    target = {
        key: jax.ShapeDtypeStruct(expected[key], jnp.dtype(dtype or stored[key].dtype))
        for key in expected
    }
    handler = ocp.StandardCheckpointHandler()
    try:
        restored = handler.restore(
            step_dir / PARAMS, args=ocp.args.StandardRestore(traverse_util.unflatten_dict(target))
        )
    finally:
        handler.close()
    return traverse_util.flatten_dict(restored)


def _params_metadata(step_dir: Path) -> Any:
    """The stored tree (shapes, dtypes) of a step's `params` item alone: read through the
    whole-step handler, a training checkpoint's other items (opt_state, meta, data) would each
    log a WARNING that they "could not be restored"."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(step_dir / PARAMS).tree
    finally:
        handler.close()
