"""Training checkpoints through an Orbax CheckpointManager.

Each step directory holds `params` and `model_config` (the same items as a converter's Orbax
model checkpoint, so converters and `from_pretrained` read training checkpoints directly),
plus `opt_state`, `meta` (step, counters), `fp8_state` (stateful FP8 recipes) and `data` (the
grain iterator's position, one JSON file per host). Orbax writes a step under a temporary
name and renames it when complete, so a crash or kill mid-save leaves the previous checkpoint
as the latest good one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
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
DATA = "data"
SCHEDULE_META = "schedule"  # meta key: the settings that shaped the LR schedule


class _IteratorSnapshot:
    """The data position at save time: an async save may finish after the iterator moved on,
    so the state is taken now (grain's handler writes `get_state()` bytes as they are)."""

    def __init__(self, iterator: grain.DatasetIterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class TrainCheckpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, read_only: bool = False):
        self._every = cfg.every
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def due(self, step: int) -> bool:
        return step % self._every == 0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self,
        state: TrainState,
        model_cfg: ModelConfig,
        data: grain.DatasetIterator | None,
        meta: dict[str, Any],
        step: int | None = None,
    ) -> bool:
        """Saves this step (the caller decides when; see `due`) with `meta` (JSON: counters,
        the schedule, an objective's own position) in its `meta` item, and the grain
        iterator's position if there is one; returns whether it started. `step` names the
        checkpoint when the run counts steps other than optimizer updates (RL: rollouts);
        by default it is `state.step`."""
        updates = int(state.step)
        step = updates if step is None else step
        # The cadence is decided by the caller (Orbax's own interval logic also saves step 1).
        items = {
            PARAMS: ocp.args.StandardSave(state.params),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            MODEL_CONFIG: ocp.args.JsonSave(model_config_to_json(model_cfg)),
            META: ocp.args.JsonSave(
                {
                    "step": step,
                    "updates": updates,
                    "nonfinite_streak": int(state.nonfinite_streak),
                    **meta,
                }
            ),
        }
        if data is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data))
        if state.fp8:
            items[FP8_STATE] = ocp.args.StandardSave(state.fp8)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, abstract_state: TrainState, data: grain.DatasetIterator | None
    ) -> tuple[TrainState, dict[str, Any]]:
        """(state, meta) of step `step`, in the shapes, dtypes and shardings of
        `abstract_state`; `data` (if given) is moved to the saved position."""
        items = {
            PARAMS: ocp.args.StandardRestore(abstract_state.params),
            OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
            META: ocp.args.JsonRestore(),
        }
        if abstract_state.fp8:
            items[FP8_STATE] = ocp.args.StandardRestore(abstract_state.fp8)
        if data is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if restored[META]["step"] != step:
            raise ValueError(f"checkpoint {step}: meta says step {restored[META]['step']}")

        def scalar(value: int, like: jax.ShapeDtypeStruct) -> jax.Array:
            return jax.device_put(np.int32(value), like.sharding)

        state = TrainState(
            step=scalar(restored[META].get("updates", step), abstract_state.step),
            params=restored[PARAMS],
            opt_state=restored[OPT_STATE],
            fp8=restored[FP8_STATE] if abstract_state.fp8 else {},
            nonfinite_streak=scalar(
                restored[META].get("nonfinite_streak", 0), abstract_state.nonfinite_streak
            ),
        )
        return state, dict(restored[META])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
