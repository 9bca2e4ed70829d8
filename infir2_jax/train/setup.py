"""Set-up shared by every training objective (train/loop.py, rl/loop.py) and the planner
(plan.py): the mesh, the execution plan (FP8 policy, attention), the optimizer, the sharded
train state — random, from `train.init_from` weights, from another run's checkpoint
(`train.resume_from`) or resumed from this run's own latest verified one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
import optax
from flax import traverse_util

from infir2_jax.checkpoint.orbax_io import resolve_checkpoint_dir
from infir2_jax.config import ConfigError, RunConfig, dump_config
from infir2_jax.fp8 import Gemm, make_gemm
from infir2_jax.model.execution import ExecutionPlan, resolve_plan
from infir2_jax.model.parts import ModelParts, Params, split_model
from infir2_jax.parallel import make_layout
from infir2_jax.parallel.rules import Layout
from infir2_jax.pretrained import load_params, read_config
from infir2_jax.target import Target
from infir2_jax.train.checkpointing import TrainCheckpointer
from infir2_jax.train.optimizer import learning_rate_schedule, make_optimizer
from infir2_jax.train.sharding import check_layout, state_shardings, with_shardings
from infir2_jax.train.state import TrainState, init_state, new_state


@dataclasses.dataclass
class Setup:
    """What a run needs before its first step."""

    layout: Layout
    gemm: Gemm  # the FP8 recipe as configured (`plan.gemm`: bound to the layout and target)
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    parts: ModelParts
    state_sharding: TrainState  # of NamedShardings
    abstract: TrainState  # ShapeDtypeStructs carrying those shardings
    plan: ExecutionPlan

    def fallback_parts(self) -> ModelParts:
        """The model parts of the fallback plan (`ExecutionPlan.fallback`: the attention for
        batches the primary one cannot take), for steps built like the primary ones."""
        return self.parts.fallback()


def resolve_run_plan(cfg: RunConfig, layout: Layout, target: Target | None = None):
    """(configured GEMM policy, execution plan) of a run on `layout`; what cannot run there
    (an FP8 layer list, an attention implementation) raises ConfigError."""
    try:
        gemm = make_gemm(cfg.fp8)
        plan = resolve_plan(
            cfg.model, cfg.execution, gemm=gemm, layout=layout, target=target,
            seq_len=cfg.train.seq_len,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return gemm, plan


def prepare(
    cfg: RunConfig,
    *,
    devices: Sequence[jax.Device] | None = None,
    target: Target | None = None,
    updates: int | None = None,
    rows: int | None = None,
) -> Setup:
    """Mesh, execution plan (GEMM policy, attention), optimizer and schedule, model parts and
    state shardings; config errors (a mesh that does not fit, an FP8 layer list, an attention
    the devices cannot run) raise ConfigError.

    devices / target: the mesh's devices and what they are (default: all local devices; the
    planner passes compile-only GPUs and their model). updates: the optimizer updates the
    schedule spans (default `train.steps`; RL makes `ppo_epochs × mini_batches` per step).
    rows: the rows of one update (default `train.batch_size`; RL updates on mini-batches)."""
    updates = cfg.train.steps if updates is None else updates
    rows = cfg.train.batch_size if rows is None else rows
    layout = make_layout(cfg.parallel, None if devices is None else list(devices))
    check_layout(layout, cfg.model, cfg.train.seq_len, rows, cfg.train.micro_batches)
    gemm, plan = resolve_run_plan(cfg, layout, target)
    try:
        schedule = learning_rate_schedule(cfg.optim, updates)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    optimizer = make_optimizer(cfg.optim, updates)
    parts = split_model(cfg.model, plan)
    abstract = jax.eval_shape(
        functools.partial(new_state, cfg.model, cfg.train.seed, plan, optimizer)
    )
    sharding = state_shardings(layout, parts, optimizer, abstract)
    return Setup(
        layout, gemm, optimizer, schedule, parts, sharding, with_shardings(abstract, sharding),
        plan,
    )  # fmt: skip


@contextlib.contextmanager
def run_directory(run_dir: Path) -> Iterator[Path]:
    """`run_dir`, created for the set-up inside the block; if the set-up fails (a bad config,
    data, checkpoint or mesh) and the directory did not exist before, it is removed again, so
    a launch that fails validation leaves nothing behind (no config.yaml, no empty
    checkpoints/). A directory that existed is never removed."""
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        if not existed and jax.process_index() == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def start_state(
    cfg: RunConfig, setup: Setup, checkpointer: TrainCheckpointer, data, out: TextIO
) -> tuple[TrainState, int, dict[str, Any], bool]:
    """(state, first step, checkpoint meta, resumed from this run's own checkpoint): this
    run's latest checkpoint if any, else `train.resume_from`, else step 0 (random or
    `train.init_from`). `data` (a grain iterator, or None for objectives without one) is moved
    to the saved position. Writes the resolved config to the run directory."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.train.init_from is not None and cfg.train.resume_from is not None:
        raise ConfigError("train.init_from and train.resume_from: set one, not both")
    check_run_model(checkpointer.directory, cfg)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    restored = checkpointer.restore_latest(setup.abstract, data, out)
    if restored is not None:
        state, start, meta = restored
        print(f"resumed from {run_dir / 'checkpoints' / str(start)}", file=out, flush=True)
        return state, start, meta, True
    if cfg.train.resume_from is not None:
        root, start = resume_source(cfg)
        source = TrainCheckpointer(root, cfg.checkpoint, read_only=True)
        position = data if cfg.train.resume_data else None
        state, meta = source.verified_restore(start, setup.abstract, position)
        source.close()
        position = "its data position" if cfg.train.resume_data else "fresh data order"
        print(
            f"continuing {root / str(start)} (weights, optimizer and FP8 state, {position}) "
            "with this config's schedule",
            file=out,
            flush=True,
        )
        return state, start, meta, False
    state = initial_state(cfg, setup.plan, setup.parts, setup.optimizer, setup.state_sharding)
    return state, 0, {}, False


def check_run_model(checkpoints: Path, cfg: RunConfig) -> None:
    """A run directory is tied to its model once it holds a checkpoint (not before: a run
    that died before saving anything leaves nothing to continue). The newest checkpoint whose
    model config reads decides; unreadable ones are left to `restore_latest` to set aside, but
    a different model is an error here, before any checkpoint could be taken for corrupt."""
    steps = sorted((int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()), reverse=True)
    for step in steps:
        step_dir = checkpoints / str(step)
        try:
            previous = read_config(step_dir)
        except Exception:  # noqa: BLE001 — a damaged checkpoint: restore_latest reports it
            continue
        mismatch = cfg.model.architecture_mismatch(previous)
        if mismatch:
            raise ConfigError(
                f"{step_dir}: this run directory holds a model with {mismatch}="
                f"{getattr(previous, mismatch)!r}, not model.{mismatch}="
                f"{getattr(cfg.model, mismatch)!r}; use a new train.run_dir"
            )
        return


def initial_state(cfg: RunConfig, plan: ExecutionPlan, parts: ModelParts, optimizer, shardings):
    """The step-0 state, created directly sharded: random parameters are generated on the
    devices that own them (inside jit, sharding-invariant random bits); `train.init_from`
    weights go from host memory straight to their shards."""
    if cfg.train.init_from is None:
        init = functools.partial(new_state, cfg.model, cfg.train.seed, plan, optimizer)
        return jax.jit(init, out_shardings=shardings)()
    params, fp8 = pretrained_params(cfg, parts)
    params = jax.device_put(params, shardings.params)
    return jax.jit(lambda p, f: init_state(p, f, optimizer), out_shardings=shardings)(params, fp8)


def pretrained_params(cfg: RunConfig, parts: ModelParts) -> tuple[Params, dict]:
    """(params, zeroed FP8 histories) from `train.init_from`, as host arrays."""
    source = cfg.train.init_from
    mismatch = cfg.model.architecture_mismatch(read_config(source))
    if mismatch:
        raise ConfigError(
            f"train.init_from: {source} has a different {mismatch} than model.{mismatch}="
            f"{getattr(cfg.model, mismatch)}"
        )
    fp8 = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), parts.fp8)
    return traverse_util.unflatten_dict(dict(load_params(source, cfg.model))), fp8


def resume_source(cfg: RunConfig) -> tuple[Path, int]:
    """(checkpoints root, step) of `train.resume_from`, checked to be a compatible training
    checkpoint."""
    try:
        step_dir = resolve_checkpoint_dir(cfg.train.resume_from)
    except FileNotFoundError as e:
        raise ConfigError(f"train.resume_from: {e}") from None
    if not (step_dir / "opt_state").is_dir():
        raise ConfigError(
            f"train.resume_from: {step_dir} holds weights but no optimizer state (a converted "
            "model, not a training checkpoint); use train.init_from to start from weights"
        )
    mismatch = cfg.model.architecture_mismatch(read_config(step_dir))
    if mismatch:
        raise ConfigError(
            f"train.resume_from: {step_dir} has a different {mismatch} than "
            f"model.{mismatch}={getattr(cfg.model, mismatch)}"
        )
    return step_dir.parent, int(step_dir.name)
