"""The training run: config -> data, model, optimizer -> jitted steps, logs and checkpoints."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
import yaml
from flax import traverse_util

from infir2_jax.config import ConfigError, RunConfig, dump_config, parse_config
from infir2_jax.data import build_dataset
from infir2_jax.fp8 import make_gemm
from infir2_jax.parallel import batch_sharding, make_mesh, replicated
from infir2_jax.pretrained import load_params, read_config
from infir2_jax.train.checkpointing import TrainCheckpointer
from infir2_jax.train.metrics import MetricsLogger
from infir2_jax.train.optimizer import learning_rate_schedule, make_optimizer
from infir2_jax.train.state import (
    ModelParts,
    Params,
    init_params,
    init_state,
    make_train_step,
    split_model,
)
from infir2_jax.train.stopping import NonFiniteLoss, Preempted, StopRequest


def _check_streak(streak: int, step: int, cfg: RunConfig, checkpointer: TrainCheckpointer):
    if streak >= cfg.train.max_nonfinite_streak:
        raise NonFiniteLoss(
            f"the loss or gradient was non-finite for {streak} steps in a row (up to step "
            f"{step}; train.max_nonfinite_streak={cfg.train.max_nonfinite_streak}); stopped "
            f"without saving; the latest checkpoint (step {checkpointer.latest_step()}) is intact"
        )


def _write_run_config(run_dir: Path, cfg: RunConfig) -> None:
    """Saves the resolved config; a resumed run must keep the architecture it continues."""
    path = run_dir / "config.yaml"
    if path.exists():
        previous = parse_config(yaml.safe_load(path.read_text())).model
        mismatch = cfg.model.architecture_mismatch(previous)
        if mismatch:
            raise ConfigError(
                f"{path}: this run directory holds a model with {mismatch}="
                f"{getattr(previous, mismatch)!r}, not model.{mismatch}="
                f"{getattr(cfg.model, mismatch)!r}; use a new train.run_dir"
            )
    path.write_text(dump_config(cfg))


def _initial_params(cfg: RunConfig, gemm, parts: ModelParts) -> tuple[Params, dict]:
    """(params, FP8 histories): random, or the weights of `train.init_from` (then nothing is
    randomly initialised)."""
    source = cfg.train.init_from
    if source is None:
        return init_params(cfg.model, cfg.train.seed, gemm)
    mismatch = cfg.model.architecture_mismatch(read_config(source))
    if mismatch:
        raise ConfigError(
            f"train.init_from: {source} has a different {mismatch} than model.{mismatch}="
            f"{getattr(cfg.model, mismatch)}"
        )
    fp8 = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), parts.fp8)
    return traverse_util.unflatten_dict(dict(load_params(source, cfg.model))), fp8


def train(cfg: RunConfig, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Runs (or resumes) training to `train.steps`; returns the metrics logged by this call."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_run_config(run_dir, cfg)

    mesh = make_mesh(cfg.parallel)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % (data_parallel * cfg.train.micro_batches):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} does not split into "
            f"train.micro_batches={cfg.train.micro_batches} × {data_parallel} data-parallel devices"
        )
    try:
        gemm = make_gemm(cfg.fp8)
        gemm.layer_mask(cfg.model.num_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dataset = build_dataset(
        cfg.data,
        seq_len=cfg.train.seq_len,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        vocab_size=cfg.model.vocab_size,
    )
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    parts = split_model(cfg.model, gemm)

    abstract = jax.eval_shape(
        lambda: init_state(*init_params(cfg.model, cfg.train.seed, gemm), optimizer)
    )
    state_sharding = jax.tree.map(lambda _: replicated(mesh), abstract)  # parameters replicated
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )

    checkpointer = TrainCheckpointer(run_dir / "checkpoints", cfg.checkpoint)
    start = checkpointer.latest_step()
    if start is not None:
        state = checkpointer.restore(start, abstract)
        print(f"resumed from {run_dir / 'checkpoints' / str(start)}", file=out, flush=True)
    else:
        start = 0
        params, fp8 = _initial_params(cfg, gemm, parts)
        state = jax.jit(lambda p, f: init_state(p, f, optimizer), out_shardings=state_sharding)(
            params, fp8
        )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(
        f"model: {n_params:,} parameters | mesh {dict(mesh.shape)} | "
        f"batch {cfg.train.batch_size}×{cfg.train.seq_len} | fp8 {cfg.fp8.recipe} | "
        f"steps {start}->{cfg.train.steps}",
        file=out,
        flush=True,
    )
    if start >= cfg.train.steps:
        print(f"already at step {start} >= train.steps={cfg.train.steps}; nothing to do", file=out)
        checkpointer.close()
        return []

    step_fn = jax.jit(
        make_train_step(parts, optimizer, schedule, cfg.train.micro_batches),
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )
    logger = MetricsLogger(run_dir / "metrics.jsonl", cfg.train.steps, start, out)
    history = []
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    last_time, last_step = time.perf_counter(), start
    stop = StopRequest()
    try:
        for step in range(start, cfg.train.steps):
            if stop.requested:  # SLURM pre-emption: checkpoint this step and leave cleanly
                checkpointer.save(state, cfg.model, force=True)
                print(
                    f"stopped by {stop.requested} after step {step}; checkpoint saved, "
                    "re-run the same command to resume",
                    file=out,
                    flush=True,
                )
                raise Preempted(step)
            batch = jax.device_put(dataset.batch(step), batch_sharding(mesh))
            state, metrics = step_fn(state, batch)
            done = step + 1
            if done == 1 or done % cfg.train.log_every == 0 or done == cfg.train.steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                rate = tokens_per_step * (done - last_step) / (now - last_time)
                last_time, last_step = now, done
                logger.log(done, metrics, rate)
                history.append({"step": done, **{k: float(v) for k, v in metrics.items()}})
                _check_streak(int(metrics["nonfinite_streak"]), done, cfg, checkpointer)
            if checkpointer.due(done) or done == cfg.train.steps:
                _check_streak(int(state.nonfinite_streak), done, cfg, checkpointer)
                checkpointer.save(state, cfg.model, force=True)
    finally:
        stop.restore()
        checkpointer.close()
        logger.close()
    print(f"done: {cfg.train.steps} steps, checkpoints in {run_dir / 'checkpoints'}", file=out)
    return history
