"""Grading model answers: answer extraction, rewards, and a pool that grades under hard
limits. Shared by RL (rewards) and evaluation (re-grading evalscope's predictions)."""

from infir2_jax.grading.answers import THINK_END, extract_answer, last_boxed, last_integer
from infir2_jax.grading.pool import Grades, RewardPool
from infir2_jax.grading.rewards import (
    REWARDS,
    ExactIntegerReward,
    MathReward,
    make_reward,
    math_equal,
    register_reward,
)

__all__ = [
    "REWARDS",
    "THINK_END",
    "ExactIntegerReward",
    "Grades",
    "MathReward",
    "RewardPool",
    "extract_answer",
    "last_boxed",
    "last_integer",
    "make_reward",
    "math_equal",
    "register_reward",
]
