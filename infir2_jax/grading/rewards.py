"""Rewards for RL rollouts and evaluation re-grading: a registry of graders, and math answers
graded by `math-verify`.

`math` (InfiR2's reward): the answer is taken from the response after its last `</think>`
(none and `require_thinking`: reward 0), as the content of the last `\\boxed{...}` (nested
braces allowed) or, failing that, a last line `Answer: ...`; it scores 1 if it is symbolically
equal to the label (math-verify: fractions, LaTeX, equivalent expressions), else 0. An answer
that could blow up symbolically (`answers.costly_reason`) is compared as text instead.
`exact_integer`: the last integer in the answer equals the integer label (tiny_rl's task),
compared as digit strings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from infir2_jax.grading.answers import (
    after_thinking,
    canonical_integer,
    costly_reason,
    extract_answer,
    last_integer,
)


def math_equal(answer: str, label: str) -> bool:
    """Symbolic equality of two LaTeX/plain answers by math-verify (gold = label)."""
    if costly_reason(answer) is not None:
        return answer.strip() == label.strip()
    from math_verify import parse, verify

    # Timeouts are the pool's (grading/pool.py); math-verify warns on every call that its
    # own are off.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(f"${label}$", parsing_timeout=None)
    pred = parse(f"${answer}$", parsing_timeout=None)
    if not gold or not pred:
        return answer.strip() == label.strip()
    return bool(verify(gold, pred, timeout_seconds=None))


@dataclasses.dataclass(frozen=True)
class MathReward:
    """1.0 when the extracted answer equals the label symbolically, else 0.0."""

    require_thinking: bool = False

    def __call__(self, response: str, label: str) -> float:
        answer = extract_answer(response, self.require_thinking)
        return float(answer is not None and math_equal(answer, str(label)))

    def warm_up(self) -> None:
        """Imports math-verify (sympy, the LaTeX parser) before the first timed sample."""
        import math_verify  # noqa: F401


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
        return float(value is not None and value == canonical_integer(str(label)))


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
