"""Training checkpoints through an Orbax CheckpointManager.

Each step directory holds `params` and `model_config` (the same items as a converter's Orbax
model checkpoint, so converters and `from_pretrained` read training checkpoints directly),
plus `opt_state`, `meta` (step, counters), `fp8_state` (stateful FP8 recipes) and `data` (the
grain iterator's position, one JSON file per host). Orbax writes a step under a temporary
name and renames it when complete, so a crash or kill mid-save leaves the previous checkpoint
as the latest good one; leftover temporary directories are removed when the next run opens
the directory.

A run trusts a checkpoint only after `restore_latest` verified it (train/integrity.py: file
checksums, stored dtypes, finite values); one that fails is moved aside to
`corrupt_checkpoints/` beside `checkpoints/` — never deleted, never counted by `keep` — and
the next older one is tried. A failed save stops the run at the next `check()`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, TextIO

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from infir2_jax.checkpoint.orbax_io import MODEL_CONFIG, PARAMS, model_config_to_json
from infir2_jax.config import CheckpointConfig
from infir2_jax.model import ModelConfig
from infir2_jax.train.integrity import (
    CheckpointCorrupt,
    ManifestWriter,
    check_dtypes,
    check_finite,
    verify_manifest,
)
from infir2_jax.train.state import TrainState

OPT_STATE = "opt_state"
FP8_STATE = "fp8_state"  # only for stateful FP8 recipes (Orbax rejects empty items)
META = "meta"
DATA = "data"
SCHEDULE_META = "schedule"  # meta key: the settings that shaped the LR schedule
CORRUPT_DIR = "corrupt_checkpoints"  # beside checkpoints/: steps that failed verification


class CheckpointSaveFailed(Exception):
    """Writing a checkpoint failed (disk full, permissions, ...); the message says which and
    that the previous one is intact."""


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
            cleanup_tmp_directories=not read_only,
        )
        # Handlers named per item: metadata (dtypes) can be read before restoring, and Orbax
        # does not warn about items it cannot interpret.
        handlers = {
            PARAMS: ocp.StandardCheckpointHandler(),
            OPT_STATE: ocp.StandardCheckpointHandler(),
            FP8_STATE: ocp.StandardCheckpointHandler(),
            MODEL_CONFIG: ocp.JsonCheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._read_only = read_only
        self._manifests = ManifestWriter(self.directory)
        self._saving: int | None = None  # the step of the save in flight, if any

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
        self.check(wait=True)  # a failure here is the previous save's, not this one's
        if step in self._manager.all_steps():
            return False  # saved already (a stop requested right after a scheduled save)
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
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 — raised as one clear line, not a traceback
            raise self._failed(step, e) from e
        self._saving = step
        if started and jax.process_index() == 0:
            self._manifests.after_save(step)
        return started

    def check(self, wait: bool = False) -> None:
        """Raises CheckpointSaveFailed if a background save has failed (called every step, so
        a full disk stops the run at once, not one interval later); `wait`: for the save in
        flight to finish first."""
        try:
            if wait:
                self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._failed(self._saving, e) from e

    def _failed(self, step: int | None, error: Exception) -> CheckpointSaveFailed:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        previous = [s for s in self._manager.all_steps() if s != step]
        intact = (
            f"checkpoint {max(previous)} is intact" if previous else "no earlier checkpoint exists"
        )
        return CheckpointSaveFailed(
            f"saving checkpoint {step} to {self.directory} failed ({type(error).__name__}: "
            f"{first}); {intact}"
        )

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

    def restore_latest(
        self, abstract_state: TrainState, data: grain.DatasetIterator | None, out: TextIO
    ) -> tuple[TrainState, int, dict[str, Any]] | None:
        """(state, step, meta) of the newest checkpoint that restores and verifies, or None if
        there is none. One that fails is named with its reason, moved aside and the next older
        one tried; if every checkpoint fails, CheckpointCorrupt lists them all."""
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, meta = self.verified_restore(step, abstract_state, data)
            except Exception as e:  # noqa: BLE001 — any unreadable checkpoint is set aside
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                aside = self._set_aside(step)
                print(
                    f"warning: checkpoint {self.directory / str(step)} failed verification: "
                    f"{reason}; moved to {aside}, trying the previous one",
                    file=out,
                    flush=True,
                )
                failures.append(f"{step}: {reason}")
                continue
            return state, step, meta
        if failures:
            raise CheckpointCorrupt(
                f"no checkpoint in {self.directory} verifies ({'; '.join(failures)}); they were "
                f"moved to {self.directory.parent / CORRUPT_DIR}"
            )
        return None

    def verified_restore(
        self, step: int, abstract_state: TrainState, data: grain.DatasetIterator | None
    ) -> tuple[TrainState, dict[str, Any]]:
        """`restore` after the step's files match their checksums and its arrays' dtypes
        match the run's, and only if every parameter and optimizer moment is finite."""
        where = str(self.directory / str(step))
        verify_manifest(self.directory / str(step))
        stored = self._manager.item_metadata(step)
        for item, expected in (
            (PARAMS, abstract_state.params),
            (OPT_STATE, abstract_state.opt_state),
        ):
            check_dtypes(_flat(stored[item]), _flat(expected), f"{where}/{item}")
        state, meta = self.restore(step, abstract_state, data)
        check_finite({PARAMS: state.params, OPT_STATE: state.opt_state}, where)
        return state, meta

    def _set_aside(self, step: int) -> Path:
        target = self.directory.parent / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and not self._read_only:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self._manager.reload()
        return target

    def close(self) -> None:
        try:
            self.check(wait=True)
        finally:
            self._manifests.wait()
            self._manager.close()


def _flat(tree) -> dict[tuple[str, ...], Any]:
    """Leaves by path, keys as strings: the abstract state (namedtuples, dicts) and Orbax's
    stored metadata of it (lists, dicts) flatten to the same paths."""

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(getattr(tree, "tree", tree))[0]
    return {tuple(name(k) for k in path): leaf for path, leaf in leaves}
