"""Rewards for RL rollouts: a registry of graders, and math answers graded by `math-verify`.

`math` (InfiR2's reward): the answer is taken from the response after its last `</think>`
(none and `require_thinking`: reward 0), as the content of the last `\\boxed{...}` (nested
braces allowed) or, failing that, a last line `Answer: ...`; it scores 1 if it is symbolically
equal to the label (math-verify: fractions, LaTeX, equivalent expressions), else 0.
`exact_integer`: the last integer in the answer equals the integer label (tiny_rl's task).

Grading runs in a pool of worker processes with a per-sample timeout (sympy can hang on a
pathological expression): such a sample scores 0 and is counted, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import re
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

THINK_END = "</think>"
_ANSWER_LINE = re.compile(
    r"^\s*\**(?:final\s+)?answer\**\s*[:：]\s*\**\s*(.+?)\s*\**\s*$", re.IGNORECASE | re.MULTILINE
)
_INTEGER = re.compile(r"-?\d[\d,]*")
# Longer answers are not expressions worth handing to sympy.
MAX_ANSWER_CHARS = 1000


def after_thinking(response: str, require_thinking: bool) -> str | None:
    """The part of `response` after its last `</think>`; without one, the whole response, or
    None if thinking is required."""
    head, sep, tail = response.rpartition(THINK_END)
    if sep:
        return tail
    return None if require_thinking else response


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None  # unbalanced


def extract_answer(response: str, require_thinking: bool = False) -> str | None:
    """The final answer of a response (see the module docstring), or None."""
    text = after_thinking(response, require_thinking)
    if text is None:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip().rstrip(".").strip("$ ") or None
    return None


def math_equal(answer: str, label: str) -> bool:
    """Symbolic equality of two LaTeX/plain answers by math-verify (gold = label)."""
    from math_verify import parse, verify

    # Timeouts are ours (RewardPool); math-verify warns on every call that its own are off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    gold = parse(f"${label}$", parsing_timeout=None)
    pred = parse(f"${answer}$", parsing_timeout=None)
    if not gold or not pred:
        return answer.strip() == label.strip()
    return bool(verify(gold, pred, timeout_seconds=None))


def last_integer(text: str) -> int | None:
    found = _INTEGER.findall(text)
    return int(found[-1].replace(",", "")) if found else None


@dataclasses.dataclass(frozen=True)
class MathReward:
    """1.0 when the extracted answer equals the label symbolically, else 0.0."""

    require_thinking: bool = False

    def __call__(self, response: str, label: str) -> float:
        answer = extract_answer(response, self.require_thinking)
        return float(answer is not None and math_equal(answer, str(label)))


@dataclasses.dataclass(frozen=True)
class ExactIntegerReward:
    """1.0 when the last integer of the answer (boxed, `Answer:` line, or else the whole text
    after thinking) equals the integer label."""

    require_thinking: bool = False

    def __call__(self, response: str, label: str) -> float:
        text = after_thinking(response, self.require_thinking)
        if text is None:
            return 0.0
        answer = extract_answer(text) or text
        value = last_integer(answer)
        return float(value is not None and value == int(str(label).strip()))


REWARDS: dict[str, Callable[..., Callable[[str, str], float]]] = {
    "math": MathReward,
    "exact_integer": ExactIntegerReward,
}


def register_reward(name: str, factory: Callable[..., Callable[[str, str], float]]) -> None:
    """Adds a task's reward: `factory(**options)` returns `grade(response, label) -> float`."""
    if name in REWARDS:
        raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = factory


def make_reward(name: str, **options) -> Callable[[str, str], float]:
    if name not in REWARDS:
        raise ValueError(f"rl.reward: {name!r} is not one of {sorted(REWARDS)}")
    return REWARDS[name](**options)


@dataclasses.dataclass
class Grades:
    scores: list[float]
    timeouts: int  # samples that hit the timeout (scored 0)
    errors: int  # samples whose grader raised (scored 0)


class _Timeout(Exception):
    pass


def _graded(grade: Callable[[str, str], float], response: str, label: str, timeout: float):
    """(score, "ok" | "timeout" | "error") of one sample, in a worker process's main thread,
    interrupted by SIGALRM after `timeout` seconds (sympy is Python: the signal lands)."""

    def alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return float(grade(response, label)), "ok"
    except _Timeout:
        return 0.0, "timeout"
    except Exception:  # noqa: BLE001 — one sample's grader bug must not stop the run
        return 0.0, "error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class RewardPool:
    """Grades (response, label) pairs in `workers` processes, `timeout` seconds per sample.

    A sample that times out or raises scores 0 and is counted. A worker stuck where no signal
    reaches it (inside one C call) is caught by an overall deadline: the pool is killed and
    replaced, the samples not back by then score 0 as timeouts."""

    def __init__(
        self, grade: Callable[[str, str], float], *, workers: int = 4, timeout: float = 10.0
    ):
        self.grade, self.workers, self.timeout = grade, workers, timeout
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the trainer's process (JAX, threads) must not be forked.
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self._pool

    def __call__(self, responses: Sequence[str], labels: Sequence[str]) -> Grades:
        pool = self._executor()
        futures = [
            pool.submit(_graded, self.grade, r, str(y), self.timeout)
            for r, y in zip(responses, labels, strict=True)
        ]
        rounds = -(-len(futures) // self.workers) + 1
        deadline = time.monotonic() + rounds * self.timeout + 30.0  # + worker start-up
        scores, outcomes = [], []
        for future in futures:
            try:
                score, outcome = future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except FutureTimeout:
                score, outcome = 0.0, "timeout"
            scores.append(score)
            outcomes.append(outcome)
        if time.monotonic() > deadline:
            self.close(kill=True)
        return Grades(scores, outcomes.count("timeout"), outcomes.count("error"))

    def close(self, kill: bool = False) -> None:
        if self._pool is None:
            return
        if kill:
            for process in list((self._pool._processes or {}).values()):
                process.kill()
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
