"""The run loop every objective shares: CPT/SFT (train/loop.py) and RL (rl/loop.py).

`Runner` owns the skeleton — the steps from the start (or resumed) step to `train.steps`, a
stop request between steps (SIGTERM: checkpoint once, raise `Preempted`), metrics logging and
progress, the evaluation cadence, the non-finite streak check, the checkpoint cadence and the
final save, and closing everything in `finally`. An objective subclasses it (as Tunix's RL
trainer subclasses its generic trainer) and supplies only what is its own:

  step(state, step) -> (state, raw)    one step: its batch source and update
  log_values(state, raw, done)         the metrics of a logged step and its tokens/s
  after_step(state, done)              optional: e.g. evaluation on `eval_due(done)`
  checkpoint_meta()                    optional: extra meta (counters, a data position)
  close()                              optional: its own resources (after the runner's)

`Steps` picks the jitted step functions a batch can run: the cuDNN -> Pallas attention
fallback for rows with more segments than cuDNN's packed attention takes.
"""

from __future__ import annotations

import abc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from infir2_jax.config import RunConfig
from infir2_jax.kernels.cudnn_attention import max_runs
from infir2_jax.model.parts import ModelParts
from infir2_jax.train.checkpointing import SCHEDULE_META, TrainCheckpointer
from infir2_jax.train.metrics import MetricsLogger, duration, make_sinks
from infir2_jax.train.optimizer import schedule_change, schedule_settings
from infir2_jax.train.state import TrainState
from infir2_jax.train.stopping import NonFiniteLoss, Preempted, StopRequest


class Steps:
    """The jitted step functions `build(parts)` makes (a tuple: train step, eval step, ...).
    With cuDNN attention, whose packed form takes at most `limit` segments per row, a batch
    with more runs through the same functions built for `fallback_parts()` (the Pallas flash
    kernel; built on first need, said once), so a long run never stops on an unusually
    fragmented row. `limit` None: every batch runs the main functions."""

    def __init__(
        self,
        build: Callable[[ModelParts], tuple],
        parts: ModelParts,
        fallback_parts: Callable[[], ModelParts],
        limit: int | None,
        out: TextIO = sys.stdout,
    ):
        self._build, self._fallback_parts, self._limit, self._out = (
            build, fallback_parts, limit, out,
        )  # fmt: skip
        self.main = build(parts)
        self._fallback = None

    def for_batch(self, local: dict[str, np.ndarray]) -> tuple:
        """The step functions that can run this host batch."""
        if self._limit is None or (runs := max_runs(local["segment_ids"])) <= self._limit:
            return self.main
        if self._fallback is None:
            print(
                f"note: a row holds {runs} segments, more than execution.max_segments="
                f"{self._limit} that cuDNN attention takes; such batches use the Pallas flash "
                "kernel (compiling it now)",
                file=self._out,
                flush=True,
            )
            self._fallback = self._build(self._fallback_parts())
        return self._fallback


class Runner(abc.ABC):
    """Runs an objective from `start` to `train.steps` (see the module docstring for the
    hooks). `start`, `meta` and `resumed` come from `train.setup.start_state`; `data` (a grain
    iterator, or None) is checkpointed with every step and closed at the end;
    `updates_per_step` optimizer updates make one step (the schedule's horizon)."""

    console: tuple[str, ...] = ()  # metrics the progress line shows beside loss, LR, ...

    def __init__(
        self,
        cfg: RunConfig,
        checkpointer: TrainCheckpointer,
        out: TextIO,
        *,
        start: int,
        meta: dict[str, Any],
        resumed: bool,
        data=None,
        log_every: int = 1,
        eval_every: int = 0,
        updates_per_step: int = 1,
    ):
        self.cfg, self.checkpointer, self.out, self.data = cfg, checkpointer, out, data
        self.start, self.total = start, cfg.train.steps
        self.log_every, self.eval_every = log_every, eval_every
        self.run_dir = Path(cfg.train.run_dir)
        self.schedule = schedule_settings(cfg.optim, cfg.train.steps * updates_per_step)
        self.history: list[dict[str, Any]] = []
        self.logger: MetricsLogger | None = None
        self._saved = checkpointer.latest_step()  # a step is saved at most once
        change = schedule_change(meta.get(SCHEDULE_META), self.schedule, start * updates_per_step)
        if change:  # expected for a decay run (resume_from); a surprise when re-running a run
            print(f"{'warning: ' if resumed else ''}{change}", file=out, flush=True)

    # ---- what an objective supplies

    @abc.abstractmethod
    def step(self, state: TrainState, step: int) -> tuple[TrainState, Any]:
        """Step `step` (0-based): (new state, what `log_values` turns into metrics)."""

    @abc.abstractmethod
    def log_values(self, state: TrainState, raw: Any, done: int) -> tuple[dict[str, Any], float]:
        """(metrics of the logged step `done`, with `nonfinite_streak`; tokens per second)."""

    def after_step(self, state: TrainState, done: int) -> None:  # noqa: B027 (optional hook)
        """Runs after step `done` is logged, before it is checkpointed."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """What each checkpoint's `meta` item records besides step and counters of updates."""
        return {SCHEDULE_META: self.schedule}

    def close(self) -> None:
        self.checkpointer.close()
        if self.logger is not None:
            self.logger.close()
        if hasattr(self.data, "close"):  # stops grain worker processes (data.workers > 0)
            self.data.close()

    # ---- cadences and checks

    def log_due(self, done: int) -> bool:
        return done == 1 or done % self.log_every == 0 or done == self.total

    def eval_due(self, done: int) -> bool:
        return bool(self.eval_every) and (done % self.eval_every == 0 or done == self.total)

    def check_streak(self, streak: int, step: int) -> None:
        limit = self.cfg.train.max_nonfinite_streak
        if streak >= limit:
            raise NonFiniteLoss(
                f"the loss or gradient was non-finite for {streak} steps in a row (up to step "
                f"{step}; train.max_nonfinite_streak={limit}); stopped without saving; the "
                f"latest checkpoint (step {self.checkpointer.latest_step()}) is intact"
            )

    def save(self, state: TrainState, step: int) -> bool:
        """Checkpoints `state` as step `step`, unless that step is saved already or the last
        update was skipped as non-finite (a checkpoint never holds a diverging state, so `keep`
        never rotates the last finite one away); returns whether step `step` is saved."""
        if step == self._saved:
            return True
        streak = int(state.nonfinite_streak)
        self.check_streak(streak, step)
        if streak:
            print(
                f"note: step {step} not checkpointed: the last {streak} update(s) were skipped "
                f"as non-finite; checkpoint {self.checkpointer.latest_step()} stays the latest",
                file=self.out,
                flush=True,
            )
            return False
        self.checkpointer.save(state, self.cfg.model, self.data, self.checkpoint_meta(), step=step)
        self._saved = step
        return True

    # ---- the loop

    def run(self, state: TrainState) -> list[dict[str, Any]]:
        """Runs the remaining steps; returns the metrics logged by this call. A stop request
        checkpoints the finished step and raises `Preempted` (the CLI exits 143)."""
        if self.start >= self.total:
            print(
                f"already at step {self.start} >= train.steps={self.total}; nothing to do",
                file=self.out,
            )
            self.close()
            return []
        primary = jax.process_index() == 0
        sinks = make_sinks(self.cfg, self.run_dir, self.start, self.out) if primary else []
        self.logger = MetricsLogger(
            self.run_dir / "metrics.jsonl" if primary else None, self.total, self.start,
            self.out, sinks=sinks, eval_every=self.eval_every,
        )  # fmt: skip
        stop = StopRequest()
        started = time.perf_counter()
        try:
            for step in range(self.start, self.total):
                if stop.requested:  # SLURM pre-emption: checkpoint this step and leave cleanly
                    saved = "checkpoint saved" if self.save(state, step) else "nothing saved"
                    print(
                        f"stopped by {stop.requested} after step {step}; {saved}, "
                        "re-run the same command to resume",
                        file=self.out,
                        flush=True,
                    )
                    raise Preempted(step)
                state = self._advance(state, step)
        finally:
            stop.restore()
            self.close()
        print(self._summary(time.perf_counter() - started), file=self.out, flush=True)
        return self.history

    def _summary(self, seconds: float) -> str:
        """The last line: steps, wall time of this call (compilation included), the final
        loss, the tokens this call trained on (rows × sequence length, padding included) and
        where the checkpoints are."""
        ran = self.total - self.start
        batch, seq_len = self.cfg.train.batch_size, self.cfg.train.seq_len
        losses = [h["loss"] for h in self.history if "loss" in h]
        loss = f" | final loss {losses[-1]:.4f}" if losses else ""
        resumed = f" ({ran} in this run)" if self.start else ""
        return (
            f"done: {self.total} steps{resumed} in {duration(seconds)}{loss} | "
            f"{ran * batch * seq_len:,} tokens ({batch}×{seq_len} per step) | "
            f"checkpoints in {self.run_dir / 'checkpoints'}"
        )

    def _advance(self, state: TrainState, step: int) -> TrainState:
        done = step + 1
        state, raw = self.step(state, step)
        if self.log_due(done):
            values, rate = self.log_values(state, raw, done)
            self.logger.log(done, values, rate, show=self.console)
            self.history.append({"step": done, **{k: float(v) for k, v in values.items()}})
            self.check_streak(int(values["nonfinite_streak"]), done)
        self.after_step(state, done)
        if self.checkpointer.due(done) or done == self.total:
            self.save(state, done)
        self.checkpointer.check()  # a failed background save stops the run now
        return state
