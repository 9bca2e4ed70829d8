"""The RL objective for the shared train step (train/state.py: `loss_fn(model, batch)`)."""

from __future__ import annotations

import jax

from infir2_jax.rl.policy_loss import PolicyLossConfig, policy_loss
from infir2_jax.train.state import LossFn


def policy_objective(cfg: PolicyLossConfig, num_samples: int, temperature: float) -> LossFn:
    """The policy loss over a packed rollout batch (rl/batch.py). Log-probabilities are the
    model's at the sampling temperature (what the rollout engine's are of). `old_logprobs`,
    when the batch has them (more than one update per rollout), are the trainer's before the
    first update; otherwise the current ones, without gradient (ratio 1: the first update).
    `num_samples` bounds the sample ids of a batch (static: one compilation)."""

    def loss_fn(model, batch):
        logprobs, entropy = model.token_logprobs(
            batch["input_ids"], batch["labels"], batch["positions"], batch["segment_ids"],
            temperature=temperature, with_entropy=True,
        )  # fmt: skip
        old = batch.get("old_logprobs")
        old = jax.lax.stop_gradient(logprobs) if old is None else old
        return policy_loss(
            logprobs, old, batch["advantages"], batch["loss_mask"], batch["sample_ids"],
            num_samples, cfg, rollout_logprobs=batch.get("rollout_logprobs"),
            ref_logprobs=batch.get("ref_logprobs"), entropy=entropy,
        )  # fmt: skip

    return loss_fn
