"""Training checkpoints through an Orbax CheckpointManager.

Each step directory holds `params` and `model_config` (the same items as a converter's Orbax
model checkpoint, so converters and `from_pretrained` read training checkpoints directly),
plus `opt_state` and `meta`. Orbax writes a step under a temporary name and renames it when
complete, so a crash or kill mid-save leaves the previous checkpoint as the latest good one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from infir2_jax.checkpoint.orbax_io import MODEL_CONFIG, PARAMS, model_config_to_json
from infir2_jax.config import CheckpointConfig
from infir2_jax.model import ModelConfig
from infir2_jax.train.state import TrainState

OPT_STATE = "opt_state"
FP8_STATE = "fp8_state"  # only for stateful FP8 recipes (Orbax rejects empty items)
META = "meta"


class TrainCheckpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self._every = cfg.every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def due(self, step: int) -> bool:
        return step % self._every == 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, model_cfg: ModelConfig, *, force: bool = False) -> bool:
        """Saves if the step is due (every N) or `force`; returns whether a save started."""
        step = int(state.step)
        if not (force or self.due(step)):
            return False
        # The cadence is decided here (Orbax's own interval logic also saves the first step).
        items = {
            PARAMS: ocp.args.StandardSave(state.params),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            MODEL_CONFIG: ocp.args.JsonSave(model_config_to_json(model_cfg)),
            META: ocp.args.JsonSave(
                {"step": step, "nonfinite_streak": int(state.nonfinite_streak)}
            ),
        }
        if state.fp8:
            items[FP8_STATE] = ocp.args.StandardSave(state.fp8)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: TrainState) -> TrainState:
        """Restores step `step` into the shapes, dtypes and shardings of `abstract_state`."""
        items = {
            PARAMS: ocp.args.StandardRestore(abstract_state.params),
            OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
            META: ocp.args.JsonRestore(),
        }
        if abstract_state.fp8:
            items[FP8_STATE] = ocp.args.StandardRestore(abstract_state.fp8)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if restored[META]["step"] != step:
            raise ValueError(f"checkpoint {step}: meta says step {restored[META]['step']}")

        def scalar(value: int, like: jax.ShapeDtypeStruct) -> jax.Array:
            return jax.device_put(np.int32(value), like.sharding)

        return TrainState(
            step=scalar(step, abstract_state.step),
            params=restored[PARAMS],
            opt_state=restored[OPT_STATE],
            fp8=restored[FP8_STATE] if abstract_state.fp8 else {},
            nonfinite_streak=scalar(
                restored[META].get("nonfinite_streak", 0), abstract_state.nonfinite_streak
            ),
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
