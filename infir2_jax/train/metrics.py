"""Where metrics go: metrics.jsonl (one JSON object per logged step), a human-readable
progress line, TensorBoard event files, and Weights & Biases when enabled and installed."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

from infir2_jax.config import LoggingConfig, RunConfig


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _rate(tokens_per_sec: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_sec >= scale:
            return f"{tokens_per_sec / scale:.1f}{unit}"
    return f"{tokens_per_sec:.0f}"


def open_jsonl_for_resume(path: Path, resume_step: int):
    """Opens a per-step JSONL file for appending, first dropping records past `resume_step`
    so that the file reads as one uninterrupted run."""
    if path.exists():
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= resume_step
        ]
        path.write_text("".join(f"{line}\n" for line in kept))
    return open(path, "a")  # noqa: SIM115 (open for the whole run)


class Sink(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, directory: Path, resume_step: int):
        from tensorboardX import SummaryWriter

        # purge_step drops events a crashed run wrote past the checkpoint it resumes from.
        self._writer = SummaryWriter(str(directory), purge_step=resume_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, wandb, cfg: RunConfig, run_dir: Path):
        # One W&B run per run directory: a resumed job continues the same W&B run.
        run_id = hashlib.sha1(str(run_dir.absolute()).encode()).hexdigest()[:16]
        self._run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.logging.wandb_name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=cfg.to_dict(),
        )

    def write(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


def make_sinks(cfg: RunConfig, run_dir: Path, resume_step: int, out: TextIO) -> list[Sink]:
    logging: LoggingConfig = cfg.logging
    sinks: list[Sink] = []
    if logging.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", resume_step))
    if logging.wandb:
        try:
            import wandb
        except ImportError:
            print("logging.wandb=true but wandb is not installed; not logging to W&B", file=out)
        else:
            sinks.append(WandbSink(wandb, cfg, run_dir))
    return sinks


class MetricsLogger:
    """Writes each logged step to metrics.jsonl, the console and the configured sinks
    (`path` None: console only — the other hosts of a multi-host job)."""

    def __init__(
        self,
        path: Path | None,
        total_steps: int,
        resume_step: int,
        out: TextIO = sys.stdout,
        sinks: list[Sink] = (),
        eval_every: int = 0,
    ):
        self.path, self.total_steps, self.out = path, total_steps, out
        self._file = None if path is None else open_jsonl_for_resume(path, resume_step)
        self._sinks = list(sinks)
        self._start_step = resume_step
        self._start_time: float | None = None
        # The ETA counts evaluations apart: extrapolating the mean step time alone left out the
        # evaluations still to come (and, once one had run, spread its cost over every step).
        self.eval_every = eval_every
        self._eval_seconds = 0.0  # spent evaluating since the timing started
        self._eval_times: list[float] = []

    def eval_took(self, seconds: float) -> None:
        """One evaluation pass took `seconds` (the ETA adds this mean per evaluation left)."""
        self._eval_times.append(seconds)
        if self._start_time is not None:
            self._eval_seconds += seconds

    def _evals_after(self, step: int) -> int:
        """Evaluations due after `step`: every `eval_every` steps and at the last step."""
        if not self.eval_every or step >= self.total_steps:
            return 0
        every = self.eval_every
        return self.total_steps // every - step // every + bool(self.total_steps % every)

    def _eta(self, step: int, now: float) -> str:
        """The steps left at the mean step time so far (evaluations excluded), plus the
        evaluations left at their mean time; "--" until a second step is logged."""
        if self._start_time is None:  # first logged step: timing starts after compilation
            self._start_time, self._start_step = now, step
            return "--"
        stepping = now - self._start_time - self._eval_seconds
        per_step = max(stepping, 0.0) / max(step - self._start_step, 1)
        left, evals = self.total_steps - step, self._evals_after(step)
        if not evals:
            return duration(per_step * left)
        if not self._eval_times:  # not timed yet: say they are not counted
            return f"{duration(per_step * left)} + {evals} eval{'s' if evals > 1 else ''}"
        mean_eval = sum(self._eval_times) / len(self._eval_times)
        return duration(per_step * left + evals * mean_eval)

    def _record(self, step: int, values: dict[str, float]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()
        for sink in self._sinks:
            sink.write(step, values)

    def log_eval(self, step: int, loss: float, tokens: float) -> None:
        self._record(step, {"eval_loss": loss, "eval_tokens": tokens})
        width = len(str(self.total_steps))
        print(
            f"eval {step:>{width}}/{self.total_steps} | eval_loss {loss:.4f} "
            f"over {int(tokens):,} tokens",
            file=self.out,
            flush=True,
        )

    def log(
        self, step: int, metrics: dict[str, Any], tokens_per_sec: float, show: tuple = ()
    ) -> None:
        """One step: every metric to the files and sinks; the console line shows loss, LR,
        gradient norm, throughput and ETA, plus the metrics named in `show`."""
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        record["tokens_per_sec"] = tokens_per_sec
        self._record(step, {k: v for k, v in record.items() if k != "step"})
        eta_text = self._eta(step, time.perf_counter())
        width = len(str(self.total_steps))
        streak = int(record.get("nonfinite_streak", 0))
        skipped = f" | SKIPPED (non-finite, {streak} in a row)" if streak else ""
        overlong = ""
        if record.get("truncated_samples") or record.get("dropped_samples"):
            overlong = (
                f" | over-long: {int(record.get('truncated_samples', 0))} truncated, "
                f"{int(record.get('dropped_samples', 0))} dropped"
            )
        extra = "".join(f" | {k} {record[k]:.4g}" for k in show if k in record)
        print(
            f"step {step:>{width}}/{self.total_steps} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | grad_norm {record['grad_norm']:.3f}{extra} | "
            f"{_rate(tokens_per_sec)} tok/s | ETA {eta_text}{overlong}{skipped}",
            file=self.out,
            flush=True,
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for sink in self._sinks:
            sink.close()
