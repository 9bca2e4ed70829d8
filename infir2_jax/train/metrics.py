"""metrics.jsonl (one JSON object per logged step) and a human-readable progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _rate(tokens_per_sec: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_sec >= scale:
            return f"{tokens_per_sec / scale:.1f}{unit}"
    return f"{tokens_per_sec:.0f}"


class MetricsLogger:
    """Appends to `metrics.jsonl`; on resume, drops records past the restored step so the file
    reads as one uninterrupted run."""

    def __init__(self, path: Path, total_steps: int, resume_step: int, out: TextIO = sys.stdout):
        self.path, self.total_steps, self.out = path, total_steps, out
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(f"{line}\n" for line in kept))
        self._file = open(path, "a")  # noqa: SIM115 (open for the whole run)
        self._start_step = resume_step
        self._start_time: float | None = None

    def log(self, step: int, metrics: dict[str, Any], tokens_per_sec: float) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        record["tokens_per_sec"] = tokens_per_sec
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        now = time.perf_counter()
        if self._start_time is None:  # first logged step: timing starts after compilation
            self._start_time, self._start_step, eta = now, step, float("nan")
        else:
            per_step = (now - self._start_time) / max(step - self._start_step, 1)
            eta = per_step * (self.total_steps - step)
        width = len(str(self.total_steps))
        eta_text = "--" if eta != eta else _duration(eta)
        streak = int(record.get("nonfinite_streak", 0))
        skipped = f" | SKIPPED (non-finite, {streak} in a row)" if streak else ""
        print(
            f"step {step:>{width}}/{self.total_steps} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | grad_norm {record['grad_norm']:.3f} | "
            f"{_rate(tokens_per_sec)} tok/s | ETA {eta_text}{skipped}",
            file=self.out,
            flush=True,
        )

    def close(self) -> None:
        self._file.close()
