"""Grading (response, label) pairs under hard limits, so that the policy's own output can
neither wedge nor end a run.

Each worker is a process of its own (spawned: the trainer holds JAX threads) that grades one
sample at a time under a memory limit (RLIMIT_AS: an answer that makes sympy allocate without
bound raises MemoryError there, or the worker dies). A Python-level alarm ends a slow sample
at `timeout` seconds; work inside one C call (big-integer arithmetic), where no signal lands,
is ended by the parent, which kills the worker `KILL_GRACE` seconds later and starts a
replacement. A sample that times out, raises, or whose worker dies scores 0 and is counted;
the other samples and the run go on.

`workers=0` grades in the calling process with the alarm alone (no memory limit, and C-level
work is not interruptible): for cheap graders such as `exact_integer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

KILL_GRACE = 2.0  # seconds past the timeout before a silent worker is killed
STARTUP_TIMEOUT = 120.0  # seconds for a new worker to import its grader


@dataclasses.dataclass
class Grades:
    scores: list[float]
    timeouts: int  # samples that hit the time limit (scored 0)
    errors: int  # samples whose grader raised or whose worker died (scored 0)


class _Timeout(Exception):
    pass


def graded(grade: Callable[[str, str], float], response: str, label: str, timeout: float):
    """(score, "ok" | "timeout" | "error") of one sample; on the main thread, interrupted by
    SIGALRM after `timeout` seconds (Python-level work only)."""
    main = threading.current_thread() is threading.main_thread()
    if main:

        def alarm(signum, frame):
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return float(grade(response, label)), "ok"
    except _Timeout:
        return 0.0, "timeout"
    except Exception:  # noqa: BLE001 — one sample's grader bug (or MemoryError) is one sample's
        return 0.0, "error"
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _serve(conn, grade, timeout: float, memory_bytes: int | None) -> None:
    """A worker: grade each (response, label) received until None or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    warm_up = getattr(grade, "warm_up", None)
    if warm_up is not None:
        warm_up()
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(graded(grade, *task, timeout))


class _Worker:
    def __init__(self, ctx, grade, timeout: float, memory_bytes: int | None):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(child, grade, timeout, memory_bytes), daemon=True
        )
        self.process.start()
        child.close()
        self.ready, self.task, self.since = False, None, time.monotonic()

    def send(self, index: int, response: str, label: str) -> None:
        self.conn.send((response, label))
        self.task, self.since = index, time.monotonic()

    def stop(self, kill: bool = False) -> None:
        if not kill:
            with contextlib.suppress(OSError):  # a worker that died already
                self.conn.send(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


class RewardPool:
    """Grades (response, label) pairs in `workers` processes, `timeout` seconds and
    `memory_mb` MiB of address space per sample (see the module docstring)."""

    def __init__(
        self,
        grade: Callable[[str, str], float],
        *,
        workers: int = 4,
        timeout: float = 10.0,
        memory_mb: int | None = 4096,
    ):
        self.grade, self.timeout = grade, timeout
        self.memory_bytes = memory_mb * 2**20 if memory_mb else None
        self._ctx = multiprocessing.get_context("spawn")
        self._size = workers
        self._workers: list[_Worker] = []
        self.replaced = 0  # workers killed or dead and started anew

    def __call__(self, responses: Sequence[str], labels: Sequence[str]) -> Grades:
        pairs = list(zip(responses, (str(y) for y in labels), strict=True))
        if self._size == 0:
            results = [graded(self.grade, r, y, self.timeout) for r, y in pairs]
        else:
            results = self._in_workers(pairs)
        outcomes = [o for _, o in results]
        return Grades([s for s, _ in results], outcomes.count("timeout"), outcomes.count("error"))

    def _in_workers(self, pairs: list[tuple[str, str]]) -> list[tuple[float, str]]:
        while len(self._workers) < self._size:
            self._workers.append(self._start())
        results: list[tuple[float, str] | None] = [None] * len(pairs)
        queue = deque(enumerate(pairs))
        while any(r is None for r in results):
            for worker in self._workers:
                if worker.ready and worker.task is None and queue:
                    index, (response, label) = queue.popleft()
                    worker.send(index, response, label)
            handles = [h for w in self._workers for h in (w.conn, w.process.sentinel)]
            wait(handles, timeout=0.2)
            for slot, worker in enumerate(self._workers):
                finished = self._check(worker)
                if finished is None:
                    continue
                index, result, alive = finished
                if index is not None:
                    results[index] = result
                if not alive:
                    self._workers[slot] = self._start()
                    self.replaced += 1
        return results  # type: ignore[return-value]

    def _check(self, worker: _Worker):
        """(sample index or None, its result, worker still usable) when something happened
        to `worker`; None when it is still busy or idle."""
        if worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                message = None
            if message == "ready":
                worker.ready = True
                return None, None, True
            if message is not None:
                index, worker.task = worker.task, None
                return index, message, True
        if not worker.process.is_alive():
            if not worker.ready:
                raise RuntimeError(
                    f"a reward worker exited with code {worker.process.exitcode} before it "
                    "was ready (the grader failed to import or to start)"
                )
            worker.stop(kill=True)
            return worker.task, (0.0, "error"), False
        waited = time.monotonic() - worker.since
        if worker.task is not None and waited > self.timeout + KILL_GRACE:
            worker.stop(kill=True)
            return worker.task, (0.0, "timeout"), False
        if not worker.ready and waited > STARTUP_TIMEOUT:
            worker.stop(kill=True)
            raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT:.0f} s")
        return None

    def _start(self) -> _Worker:
        return _Worker(self._ctx, self.grade, self.timeout, self.memory_bytes)

    def close(self, kill: bool = False) -> None:
        for worker in self._workers:
            worker.stop(kill=kill)
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
