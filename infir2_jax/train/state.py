"""The train state pytree and the pure `train_step(state, batch) -> (state, metrics)`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

from infir2_jax.fp8 import Gemm
from infir2_jax.model import ExecutionPlan, ModelConfig, Qwen2
from infir2_jax.model.parts import ModelParts, Params, init_params
from infir2_jax.parallel.rules import Layout, activation_layout

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    opt_state: optax.OptState
    fp8: dict[str, Any]  # stateful recipes' FP8 state, e.g. amax histories ({} if stateless)
    nonfinite_streak: jax.Array  # int32: consecutive steps skipped for a non-finite loss/grad


def new_state(
    cfg: ModelConfig, seed: int, plan: ExecutionPlan, optimizer: optax.GradientTransformation
) -> TrainState:
    """Step 0 from random parameters (under `jax.jit` with out_shardings: created sharded)."""
    return init_state(*init_params(cfg, seed, plan), optimizer)


def init_state(
    params: Params, fp8: dict[str, Any], optimizer: optax.GradientTransformation
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        fp8=fp8,
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


def update_fp8_state(gemm: Gemm, fp8: dict[str, Any], observed: dict[str, Any]) -> dict:
    """Each GEMM's FP8 state after this step, from the amaxes its probe observed."""
    if not fp8:
        return fp8
    states: dict[tuple, dict[str, jax.Array]] = {}
    for path, value in traverse_util.flatten_dict(fp8).items():
        states.setdefault(path[:-1], {})[path[-1]] = value
    probes = traverse_util.flatten_dict(observed)
    updated = {}
    for layer, state in states.items():
        for name, value in gemm.update_state(state, probes[(*layer, "fp8_probe")]).items():
            updated[(*layer, name)] = value
    return traverse_util.unflatten_dict(updated)


# An objective: (model, batch) -> (loss summed over what it covers, the weight to divide that
# sum by — tokens, samples — and metrics summed the same way). Sums add across micro-batches
# and devices; the step divides once, over the whole global batch.
LossFn = Callable[[Qwen2, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def next_token_loss(model: Qwen2, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
    """CPT and SFT: summed next-token cross-entropy over the tokens of `loss_mask`."""
    total, tokens = model.loss(
        batch["input_ids"],
        batch["labels"],
        batch["loss_mask"],
        batch["positions"],
        batch["segment_ids"],
    )
    return total, tokens, {}


def _summed_loss_fn(parts: ModelParts, loss_fn: LossFn = next_token_loss):
    """(params, probes, fp8, batch) -> (summed loss, (weight, summed metrics))."""

    def summed_loss(params: Params, probes: dict, fp8: dict, batch: Batch):
        total, weight, metrics = loss_fn(parts.bind(params, fp8, probes), batch)
        return total, (weight, metrics)

    return summed_loss


def _traced_under(layout: Layout | None):
    """Runs the decorated step with `layout` active, so tracing it (inside `jax.jit`) sees the
    activation sharding rules and the context-parallel attention."""

    def wrap(step):
        @functools.wraps(step)
        def traced(*args):
            with activation_layout(layout):
                return step(*args)

        return traced

    return wrap


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    # Strided split (row j goes to micro-batch j % M): with the batch sharded over
    # data-parallel devices, every device contributes to every micro-batch.
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(
            0, 1
        ),
        batch,
    )


def make_eval_step(
    parts: ModelParts,
    micro_batches: int = 1,
    layout: Layout | None = None,
    loss_fn: LossFn = next_token_loss,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Validation: the summed loss (`loss_sum`), its weight (`tokens`) and the objective's
    summed metrics for a batch, nothing updated (FP8 delayed scaling reads its histories; the
    amaxes it would observe are discarded)."""
    summed_loss = _summed_loss_fn(parts, loss_fn)

    @_traced_under(layout)
    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), parts.probes)
        micro = split_micro_batches(batch, micro_batches)

        def accumulate(carry, micro_batch: Batch):
            t, aux = summed_loss(state.params, probes, state.fp8, micro_batch)
            return jax.tree.map(jnp.add, carry, (t, aux)), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(summed_loss, state.params, probes, state.fp8, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (total, (weight, metrics)), _ = jax.lax.scan(accumulate, zeros, micro)
        return {"loss_sum": total, "tokens": weight, **metrics}

    return eval_step


def make_train_step(
    parts: ModelParts,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batches: int = 1,
    layout: Layout | None = None,
    loss_fn: LossFn = next_token_loss,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The step of any objective `loss_fn` (next-token CE for CPT/SFT, the policy loss for
    RL): gradients summed over `micro_batches` slices of the batch (FP8 amaxes max-combined),
    the loss divided by its weight summed over the whole global batch, one optimizer
    update, and one FP8 history update. A non-finite loss or gradient norm skips the update
    (parameters, optimizer and FP8 state unchanged; the step counter and data move on) and
    extends `nonfinite_streak`; the run loop decides when a streak is fatal.

    `layout`: the mesh and rules table the activations are constrained to while tracing
    (None: no constraints, e.g. one device)."""

    summed_loss = _summed_loss_fn(parts, loss_fn)
    grad_fn = jax.value_and_grad(summed_loss, argnums=(0, 1), has_aux=True)

    @_traced_under(layout)
    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), parts.probes)

        def accumulate(carry, micro_batch: Batch):
            sums, grads, observed = carry
            value, (g, o) = grad_fn(state.params, probes, state.fp8, micro_batch)
            sums = jax.tree.map(jnp.add, sums, value)  # (loss, (weight, metrics))
            grads = jax.tree.map(jnp.add, grads, g)
            observed = jax.tree.map(jnp.maximum, observed, o)  # amaxes combine by max
            return (sums, grads, observed), None

        micro = split_micro_batches(batch, micro_batches)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(summed_loss, state.params, probes, state.fp8, first)
        sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        init = (sums, *jax.tree.map(jnp.zeros_like, (state.params, probes)))
        ((total, (tokens, objective)), grads, observed), _ = jax.lax.scan(accumulate, init, micro)
        denom = jnp.maximum(tokens, 1.0)  # the mean over the global batch
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss, grad_norm = total / denom, optax.tree.norm(grads)  # norm before clipping
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updated = (
            optax.apply_updates(state.params, updates),
            opt_state,
            update_fp8_state(parts.gemm, state.fp8, observed),
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, fp8 = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            updated,
            (state.params, state.opt_state, state.fp8),
        )
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
        new_state = TrainState(state.step + 1, params, opt_state, fp8, streak)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "loss_tokens": tokens,
            "skipped": 1.0 - finite.astype(jnp.float32),
            "nonfinite_streak": streak,
            **objective,
        }
        return new_state, metrics

    return train_step
