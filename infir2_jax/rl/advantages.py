"""GRPO advantages and DAPO's dynamic sampling and overlong penalty, on the host (numpy):
rewards arrive per group (the `n` samples of one prompt) from the graders, before any batch is
packed.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def group_advantages(
    rewards: np.ndarray, *, divide_by_std: bool = True, eps: float = 1e-6
) -> np.ndarray:
    """GRPO: each sample's reward minus its group's mean, divided by the group's standard
    deviation (population std, + eps) unless `divide_by_std` is False (Dr. GRPO).
    rewards: [groups, n] -> advantages [groups, n] (float32)."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be [groups, n >= 2], got {rewards.shape}")
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if divide_by_std:
        centred = centred / (rewards.std(axis=1, keepdims=True) + eps)
    return centred.astype(np.float32)


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment, added to the reward: 0 for responses of at most
    `max_new_tokens - buffer` tokens, then falling linearly to -1 at `max_new_tokens`."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer must be in (0, {max_new_tokens}], got {buffer}")
    lengths = np.asarray(lengths, np.float64)
    return np.clip((max_new_tokens - buffer - lengths) / buffer, -1.0, 0.0)


def informative(rewards: np.ndarray) -> np.ndarray:
    """[groups] bool: groups whose rewards do not all agree (a zero-std group has zero
    advantages: it teaches nothing and only dilutes the loss)."""
    rewards = np.asarray(rewards)
    return rewards.max(axis=1) > rewards.min(axis=1)


@dataclasses.dataclass
class DynamicSampler:
    """DAPO's dynamic sampling: groups are offered as rollouts finish; informative ones are
    kept until `target` groups are held; zero-std groups are dropped and counted. The caller
    samples more prompts while `needs_more` and it has not hit its own limit of rounds."""

    target: int
    kept: list = dataclasses.field(default_factory=list)
    dropped: int = 0
    offered: int = 0

    @property
    def needs_more(self) -> bool:
        return len(self.kept) < self.target

    def offer(self, groups: list, rewards: np.ndarray) -> None:
        """groups: one item per group (anything); rewards [len(groups), n]."""
        rewards = np.asarray(rewards)
        if len(groups) != len(rewards):
            raise ValueError(f"{len(groups)} groups but rewards for {len(rewards)}")
        for group, useful in zip(groups, informative(rewards), strict=True):
            self.offered += 1
            if not useful:
                self.dropped += 1
            elif self.needs_more:
                self.kept.append(group)

    def batch(self) -> list:
        """The kept groups (at most `target`; fewer if sampling stopped at its limit)."""
        return self.kept[: self.target]
