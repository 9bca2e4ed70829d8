"""Grading under hostile answers: linear-time extraction, screens for answers that would
blow up symbolically, and a pool whose limits hold for C-level work, memory and dying
workers — a hostile sample costs its own reward, never the others' or the run."""

from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from infir2_jax.grading import ExactIntegerReward, MathReward, RewardPool, extract_answer
from infir2_jax.grading.answers import answer_line, canonical_integer, costly_reason

# The previous extraction: a regular expression whose nested quantifiers made it cubic.
_OLD_ANSWER_LINE = re.compile(
    r"^\s*\**(?:final\s+)?answer\**\s*[:：]\s*\**\s*(.+?)\s*\**\s*$", re.IGNORECASE | re.MULTILINE
)


def _old_answer_line(text: str) -> str | None:
    found = _OLD_ANSWER_LINE.findall(text)
    return found[-1].strip() if found else None


def test_answer_line_matches_the_old_regex_on_ordinary_lines():
    rng = random.Random(0)
    pieces = ["answer", "Answer", "FINAL ", "final  ", "**", ":", "：", " ", "42", "x+1", "*"]
    for _ in range(3000):
        line = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        text = f"some reasoning\n{line}\nmore"
        if ":" not in line and "：" not in line:
            continue
        assert answer_line(text) == _old_answer_line(text), repr(text)


def test_extraction_is_linear_on_hostile_text():
    for text in (" " * 2000 + "answer", "Answer:" + " " * 5000 + "*" * 5000 + "x", "{" * 20000):
        start = time.perf_counter()
        extract_answer("\\boxed{" + text)
        extract_answer(text)
        assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "answer, costly",
    [
        ("10^{10^{10^{10}}}", True),
        ("10^10^10", True),
        ("2**3**4", True),
        ("(10!)!", True),
        ("\\left(10!\\right)!", True),
        ("5000!", True),
        ("2^{100000}", True),
        ("1" * 400, True),
        ("x^2 + y^2", False),
        ("10!", False),
        ("2^{10}", False),
        ("\\frac{1}{2}", False),
        ("(n+1)!", False),
    ],
)
def test_costly_answers_are_screened(answer, costly):
    assert (costly_reason(answer) is not None) == costly


def test_hostile_math_answers_grade_fast_in_process():
    reward = MathReward()
    for answer in ("10^{10^{10^{10}}}", "(10!)!", "9" * 4301):
        start = time.perf_counter()
        assert reward(f"\\boxed{{{answer}}}", "3") == 0.0
        assert time.perf_counter() - start < 5
    assert reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0


def test_exact_integer_compares_any_length_without_conversion():
    big = "7" * 4301  # int() refuses more than 4300 digits
    assert ExactIntegerReward()(f"the answer is {big}", big) == 1.0
    assert ExactIntegerReward()(f"the answer is {big}", "7") == 0.0
    assert canonical_integer("-0,012") == "-12" and canonical_integer("-0") == "0"


def _hostile_grade(response: str, label: str) -> float:
    if response == "c-level":  # as inside one long C call: the alarm's handler never runs
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if response == "memory":
        blocks = [bytearray(2**28) for _ in range(64)]  # 16 GiB: past the limit
        return float(len(blocks))
    if response == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return float(response == label)


def test_pool_limits_hold_for_c_level_work_memory_and_dead_workers():
    responses = ["c-level", "memory", "die"] + [str(i) for i in range(20)]
    labels = ["0", "0", "0"] + [str(i) for i in range(20)]
    with RewardPool(_hostile_grade, workers=2, timeout=5.0, memory_mb=1024) as pool:
        start = time.monotonic()
        grades = pool(responses, labels)
        assert time.monotonic() - start < 60
        assert grades.scores == [0.0, 0.0, 0.0] + [1.0] * 20
        assert grades.timeouts == 1 and grades.errors == 2
        assert pool.replaced == 2  # the killed C-level worker and the dead one
        assert pool(["5"], ["5"]).scores == [1.0]  # the pool still works


def test_two_hostile_math_answers_cost_only_their_own_reward():
    hostile = ["\\boxed{10^{10^{10^{10}}}}", "\\boxed{(10!)!}"]
    correct = [f"\\boxed{{{i}}}" for i in range(20)]
    labels = ["1", "1"] + [str(i) for i in range(20)]
    with RewardPool(MathReward(), workers=2, timeout=5.0) as pool:
        grades = pool(hostile + correct, labels)
    assert grades.scores == [0.0, 0.0] + [1.0] * 20


def test_in_process_grading_has_the_time_limit():
    def slow(response: str, label: str) -> float:
        time.sleep(30)
        return 1.0

    start = time.monotonic()
    grades = RewardPool(slow, workers=0, timeout=0.5)(["a", "b"], ["a", "b"])
    assert grades.scores == [0.0, 0.0] and grades.timeouts == 2
    assert time.monotonic() - start < 5
