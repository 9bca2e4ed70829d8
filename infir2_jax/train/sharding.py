"""Where every piece of the train state lives on the mesh.

Parameters follow their logical axes through the layout's rules table; Adam's moments mirror
the parameter they belong to (ZeRO: under fsdp each device keeps only its slice of weights,
gradients and moments); the step counter, FP8 histories and other scalars are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from infir2_jax.config import ConfigError
from infir2_jax.model.parts import ModelParts
from infir2_jax.parallel.params import param_shardings
from infir2_jax.parallel.rules import Layout
from infir2_jax.train.state import (
    LossFn,
    TrainState,
    make_eval_step,
    make_train_step,
    next_token_loss,
)

# The model's inputs, each [batch, seq]: what a data batch hands the train and eval steps (an
# objective may add its own, e.g. RL's advantages) and what the planner compiles against.
MODEL_INPUTS = {
    "input_ids": np.int32,
    "labels": np.int32,
    "loss_mask": np.float32,
    "positions": np.int32,
    "segment_ids": np.int32,
}


def abstract_batch(layout: Layout, rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The model inputs of a global batch, as shapes with their sharding (for compiling)."""
    sharding = layout.batch_sharding()
    return {
        name: jax.ShapeDtypeStruct((rows, seq_len), dtype, sharding=sharding)
        for name, dtype in MODEL_INPUTS.items()
    }


def global_batch(layout: Layout, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows of the model inputs -> global arrays sharded over the data axes."""
    sharding = layout.batch_sharding()
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(local[name], dtype))
        for name, dtype in MODEL_INPUTS.items()
    }


def state_shardings(
    layout: Layout,
    parts: ModelParts,
    optimizer: optax.GradientTransformation,
    abstract: TrainState,
) -> TrainState:
    """A TrainState of NamedShardings for `abstract` (from `jax.eval_shape` of the init)."""
    replicated = layout.replicated()
    params = param_shardings(layout, parts.param_axes, parts.params)
    opt_state = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=params,
        opt_state=opt_state,
        fp8=jax.tree.map(lambda _: replicated, abstract.fp8),
        nonfinite_streak=replicated,
    )


def jit_train_step(
    layout: Layout,
    shardings: TrainState,
    parts: ModelParts,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batches: int,
    loss_fn: LossFn = next_token_loss,
):
    """The train step of `loss_fn` jitted for the mesh: explicit state/batch shardings, state
    donated."""
    return jax.jit(
        make_train_step(parts, optimizer, schedule, micro_batches, layout, loss_fn),
        in_shardings=(shardings, layout.batch_sharding()),
        out_shardings=(shardings, layout.replicated()),
        donate_argnums=0,
    )


def jit_eval_step(layout: Layout, shardings: TrainState, parts: ModelParts, micro_batches: int):
    return jax.jit(
        make_eval_step(parts, micro_batches, layout),
        in_shardings=(shardings, layout.batch_sharding()),
        out_shardings=layout.replicated(),
    )


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying their shardings (what Orbax restores into)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def check_layout(layout: Layout, model, seq_len: int, batch_size: int, micro_batches: int) -> None:
    """Shapes the mesh must divide, checked before anything is compiled."""
    data = layout.size("data") * layout.size("fsdp")
    if batch_size % (data * micro_batches):
        raise ConfigError(
            f"train.batch_size={batch_size} does not split into train.micro_batches="
            f"{micro_batches} × {data} data-parallel devices (parallel.data × parallel.fsdp)"
        )
    tensor, context = layout.size("tensor"), layout.size("context")
    if seq_len % (2 * context * tensor):
        raise ConfigError(
            f"train.seq_len={seq_len} must be a multiple of 2 × parallel.context × "
            f"parallel.tensor = {2 * context * tensor} (load-balanced context chunks, "
            "sequence-parallel residuals)"
        )
    for name in ("num_heads", "num_kv_heads"):
        if getattr(model, name) % tensor:
            raise ConfigError(
                f"model.{name}={getattr(model, name)} does not split over "
                f"parallel.tensor={tensor}: each tensor-parallel rank needs whole heads"
            )
