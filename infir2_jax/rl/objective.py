"""The RL objective for the shared train step (train/state.py: `loss_fn(model, batch)`), and
the log-probabilities it is measured against: the trainer's own before the first update (the
"old" policy) and a frozen reference's (KL)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from infir2_jax.model.parts import ModelParts, Params
from infir2_jax.parallel.rules import Layout, activation_layout
from infir2_jax.rl.policy_loss import PolicyLossConfig, policy_loss
from infir2_jax.train.state import Batch, LossFn, split_micro_batches


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


def jit_token_logprobs(
    parts: ModelParts, layout: Layout, param_sharding: Params, micro_batches: int,
    temperature: float,
) -> Callable[[Params, Batch], jax.Array]:  # fmt: skip
    """`(params, packed batch) -> log p(label)` [rows, seq] at `temperature`, for any
    parameters shaped like the policy's (its own, or the reference's in the compute dtype),
    computed in `micro_batches` slices (the train step's strided split) and sharded like the
    batch. No gradient, nothing updated."""

    def logprobs(params: Params, batch: Batch) -> jax.Array:
        with activation_layout(layout):

            def one(micro: Batch) -> jax.Array:
                model = parts.bind(params)
                out, _ = model.token_logprobs(
                    micro["input_ids"], micro["labels"], micro["positions"],
                    micro["segment_ids"], temperature=temperature,
                )  # fmt: skip
                return out

            inputs = {k: batch[k] for k in ("input_ids", "labels", "positions", "segment_ids")}
            out = jax.lax.map(one, split_micro_batches(inputs, micro_batches))
            return out.swapaxes(0, 1).reshape(batch["input_ids"].shape)  # undo the split

    data = layout.batch_sharding()
    return jax.jit(logprobs, in_shardings=(param_sharding, data), out_shardings=data)
