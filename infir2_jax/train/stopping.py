"""How a run stops early.

- SIGTERM (SLURM pre-emption, `scancel`) is a request the loop honours between steps: it
  checkpoints the step it has finished, then raises `Preempted`; the CLI exits with 143.
- Too many consecutive non-finite steps raise `NonFiniteLoss` without saving; exit 3.
"""

from __future__ import annotations

import signal
import threading


class NonFiniteLoss(Exception):
    """Too many consecutive steps had a non-finite loss or gradient; the run stopped."""


class Preempted(Exception):
    """Training stopped on a signal after checkpointing step `args[0]`."""


class StopRequest:
    """Installs a SIGTERM handler that only records the request (the loop acts on it between
    steps, so the checkpoint it writes is complete and consistent); `restore` puts the
    previous handler back."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
