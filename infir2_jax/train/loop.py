"""The training run: config -> data, model, optimizer -> jitted steps, logs and checkpoints."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from infir2_jax.config import RunConfig
from infir2_jax.data import DataPipeline, check_vocab, overlong_counts, sample_ids
from infir2_jax.kernels.cudnn_attention import max_runs
from infir2_jax.parallel import describe
from infir2_jax.train.checkpointing import SCHEDULE_META, TrainCheckpointer
from infir2_jax.train.metrics import MetricsLogger, make_sinks, open_jsonl_for_resume
from infir2_jax.train.optimizer import schedule_change, schedule_settings
from infir2_jax.train.setup import Setup, prepare, start_state
from infir2_jax.train.sharding import jit_eval_step, jit_train_step
from infir2_jax.train.stopping import NonFiniteLoss, Preempted, StopRequest


def check_streak(streak: int, step: int, cfg: RunConfig, checkpointer: TrainCheckpointer):
    if streak >= cfg.train.max_nonfinite_streak:
        raise NonFiniteLoss(
            f"the loss or gradient was non-finite for {streak} steps in a row (up to step "
            f"{step}; train.max_nonfinite_streak={cfg.train.max_nonfinite_streak}); stopped "
            f"without saving; the latest checkpoint (step {checkpointer.latest_step()}) is intact"
        )


MODEL_INPUTS = ("input_ids", "labels", "loss_mask", "positions", "segment_ids")


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded over the data-parallel devices."""
    return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in MODEL_INPUTS}


class _Steps:
    """The jitted train and eval steps. With cuDNN attention, whose packed form takes at most
    `execution.max_segments` segments per row, a batch with more runs through the same steps
    built for the plan's fallback (the Pallas flash kernel; compiled on first need, said
    once), so a long run never stops on an unusually fragmented row."""

    def __init__(self, build, setup: Setup, out: TextIO):
        self._build, self._setup, self._out = build, setup, out
        self.train, self.eval = build(setup.parts)
        self._limit = setup.plan.segment_limit
        self._fallback = None

    def for_batch(self, local: dict[str, np.ndarray]):
        """(train step, eval step) that can run this host batch."""
        if self._limit is None or (runs := max_runs(local["segment_ids"])) <= self._limit:
            return self.train, self.eval
        if self._fallback is None:
            print(
                f"note: a row holds {runs} segments, more than execution.max_segments="
                f"{self._limit} that cuDNN attention takes; such batches use the Pallas flash "
                "kernel (compiling it now)",
                file=self._out,
                flush=True,
            )
            self._fallback = self._build(self._setup.fallback_parts())
        return self._fallback


def train(cfg: RunConfig, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Runs (or resumes) training to `train.steps`; returns the metrics logged by this call."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare(cfg)
    layout, optimizer, schedule = setup.layout, setup.optimizer, setup.schedule
    state_sharding = setup.state_sharding
    attention = setup.plan.attention

    pipeline = DataPipeline(
        cfg.data,
        seq_len=cfg.train.seq_len,
        global_batch=cfg.train.batch_size,
        seed=cfg.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    data = pipeline.train_iterator()
    eval_batches = pipeline.eval_batches(cfg.train.eval_batches) if cfg.train.eval_every else []
    checkpointer = TrainCheckpointer(run_dir / "checkpoints", cfg.checkpoint)
    state, start, meta, resumed = start_state(cfg, setup, checkpointer, data, out)
    schedule_meta = schedule_settings(cfg.optim, cfg.train.steps)
    change = schedule_change(meta.get(SCHEDULE_META), schedule_meta, start)
    if change:  # expected for a decay run (resume_from); a surprise when re-running a run
        warning = "warning: " if resumed else ""
        print(f"{warning}{change}", file=out, flush=True)
    counters = {k: int(meta.get(k, 0)) for k in ("truncated_samples", "dropped_samples")}
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"mesh: {describe(layout)}", file=out, flush=True)
    print(
        f"model: {n_params:,} parameters | "
        f"batch {cfg.train.batch_size}×{cfg.train.seq_len} ({cfg.data.kind}, {cfg.data.source}) | "
        f"fp8 {cfg.fp8.recipe} | attention {attention or 'xla'} | "
        f"steps {start}->{cfg.train.steps}",
        file=out,
        flush=True,
    )
    if start >= cfg.train.steps:
        print(f"already at step {start} >= train.steps={cfg.train.steps}; nothing to do", file=out)
        checkpointer.close()
        if hasattr(data, "close"):
            data.close()
        return []

    def build_steps(model_parts):
        return (
            jit_train_step(
                layout, state_sharding, model_parts, optimizer, schedule, cfg.train.micro_batches
            ),
            jit_eval_step(layout, state_sharding, model_parts, cfg.train.micro_batches),
        )

    steps = _Steps(build_steps, setup, out)
    data_sharding = layout.batch_sharding()
    primary = jax.process_index() == 0
    logger = MetricsLogger(
        run_dir / "metrics.jsonl" if primary else None,
        cfg.train.steps,
        start,
        out,
        sinks=make_sinks(cfg, run_dir, start, out) if primary else [],
    )
    samples_file = (
        open_jsonl_for_resume(run_dir / "samples.jsonl", start)
        if cfg.data.record_samples and primary
        else None
    )
    history = []
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    last_time, last_step = time.perf_counter(), start
    stop = StopRequest()

    def save() -> None:
        check_streak(int(state.nonfinite_streak), int(state.step), cfg, checkpointer)
        checkpointer.save(state, cfg.model, data, {**counters, SCHEDULE_META: schedule_meta})

    try:
        for step in range(start, cfg.train.steps):
            if stop.requested:  # SLURM pre-emption: checkpoint this step and leave cleanly
                save()
                print(
                    f"stopped by {stop.requested} after step {step}; checkpoint saved, "
                    "re-run the same command to resume",
                    file=out,
                    flush=True,
                )
                raise Preempted(step)
            local = next(data)
            check_vocab(local, cfg.model.vocab_size)
            done = step + 1
            if samples_file is not None:
                samples_file.write(json.dumps({"step": done, "samples": sample_ids(local)}) + "\n")
            if cfg.data.kind == "sft":
                for name, count in overlong_counts(local).items():
                    counters[f"{name}_samples"] += count
            step_fn = steps.for_batch(local)[0]
            state, metrics = step_fn(state, _global_batch(local, data_sharding))
            if done == 1 or done % cfg.train.log_every == 0 or done == cfg.train.steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                rate = tokens_per_step * (done - last_step) / (now - last_time)
                last_time, last_step = now, done
                if cfg.data.kind == "sft":
                    metrics = {**metrics, **counters}
                logger.log(done, metrics, rate)
                history.append({"step": done, **{k: float(v) for k, v in metrics.items()}})
                check_streak(int(metrics["nonfinite_streak"]), done, cfg, checkpointer)
            if eval_batches and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                loss_sum, tokens = 0.0, 0.0
                for batch in eval_batches:
                    result = jax.device_get(
                        steps.for_batch(batch)[1](state, _global_batch(batch, data_sharding))
                    )
                    loss_sum += float(result["loss_sum"])
                    tokens += float(result["tokens"])
                logger.log_eval(done, loss_sum / max(tokens, 1.0), tokens)
                history.append({"step": done, "eval_loss": loss_sum / max(tokens, 1.0)})
            if checkpointer.due(done) or done == cfg.train.steps:
                save()
    finally:
        stop.restore()
        checkpointer.close()
        logger.close()
        if hasattr(data, "close"):  # stops grain worker processes (data.workers > 0)
            data.close()
        if samples_file is not None:
            samples_file.close()
    print(f"done: {cfg.train.steps} steps, checkpoints in {run_dir / 'checkpoints'}", file=out)
    return history
