"""The train state pytree and the pure `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from infir2_jax.model import ModelConfig, Qwen2

Batch = dict[str, jax.Array]
Params = dict[str, Any]  # nested dict of FP32 master weights, as `nnx.to_pure_dict` gives


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    opt_state: optax.OptState


def model_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The static structure of the model (no arrays), merged with params inside jit."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    return graphdef


def init_params(cfg: ModelConfig, seed: int) -> Params:
    return nnx.to_pure_dict(nnx.state(Qwen2(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        total, tokens = model.loss(
            batch["input_ids"],
            batch["labels"],
            batch["loss_mask"],
            batch["positions"],
            batch["segment_ids"],
        )
        # Per-token mean over the whole global batch (the recipe's normalisation).
        return total / jnp.maximum(tokens, 1.0), tokens

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),  # before clipping
            "lr": schedule(state.step),
            "loss_tokens": tokens,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
