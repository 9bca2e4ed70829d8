"""Logical-axis rules: which mesh axes each named array dimension is split over.

Model code names dimensions logically — parameters with `out_sharding` metadata ("embed",
"heads", "mlp", "vocab", ...), activations through `constrain(x, ("batch", "seq", ...))` — and
never names a mesh axis. A rules table maps those names to the mesh axes
(data, fsdp, tensor, context); one table per parallelism strategy.

Parameter names:   layers, vocab, embed, heads, kv_heads, mlp, norm
Activation names:  batch      the batch (always data-parallel: data × fsdp)
                   seq        the residual stream between blocks (sequence parallel: split
                              over tensor, and context when context-parallel)
                   inner_seq  the sequence inside attention / MLP / loss (whole over tensor,
                              split over context)
                   act_heads, act_kv_heads, act_mlp, act_vocab   tensor-parallel widths

Megatron's tensor-parallel layout falls out of these names: q/k/v/gate/up kernels are
[embed, heads|mlp] with the output split (column parallel), o/down are [heads|mlp, embed] with
the input split (row parallel); the residual stream is split over the sequence, so GSPMD
all-gathers it before the column-parallel GEMMs and reduce-scatters after the row-parallel
ones — Megatron's sequence parallelism.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

_BATCH = {"batch": ("data", "fsdp")}
_TENSOR = {
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

RULES: dict[str, Rules] = {
    # ZeRO-3 style: every matrix split on its hidden (embed) dimension, gathered per layer.
    "fsdp": {**_BATCH, "embed": "fsdp"},
    # Megatron TP with sequence parallelism for norms and residuals.
    "tensor_sequence": {**_BATCH, **_TENSOR, "seq": "tensor"},
    # ... plus context parallelism: the sequence split over `context` everywhere (attention
    # gathers K/V, see parallel/context.py), and over `tensor` too between blocks.
    "tensor_sequence_context": {
        **_BATCH,
        **_TENSOR,
        "seq": ("context", "tensor"),
        "inner_seq": "context",
    },
    # FSDP over the hidden dimension combined with Megatron TP + SP.
    "fsdp_tensor": {**_BATCH, **_TENSOR, "embed": "fsdp", "seq": "tensor"},
}

# Generation (generate/engine.py), not a training table: weights whole on each tensor-parallel
# rank (a decode step cannot afford per-layer FSDP gathers), heads and the KV cache's kv heads
# split over tensor, decode slots over the data axes; one token per slot leaves no sequence
# to split.
DECODE_RULES: Rules = {**_BATCH, **_TENSOR}


def auto_rules(mesh_sizes: Mapping[str, int]) -> str:
    """The table for a mesh when `parallel.rules: auto`."""
    if mesh_sizes["context"] > 1:
        return "tensor_sequence_context"
    if mesh_sizes["tensor"] > 1:
        return "fsdp_tensor" if mesh_sizes["fsdp"] > 1 else "tensor_sequence"
    return "fsdp"


def mesh_axes_of(rules: Rules) -> set[str]:
    used: set[str] = set()
    for axes in rules.values():
        if axes is not None:
            used.update((axes,) if isinstance(axes, str) else axes)
    return used


def logical_to_spec(axes: tuple[str | None, ...], rules: Rules) -> PartitionSpec:
    """PartitionSpec for logical dimension names; unknown names stay unsplit, and a mesh axis
    already used by an earlier dimension is not used again (e.g. vocab and seq both on
    tensor: the first one wins)."""
    taken: set[str] = set()
    spec = []
    for name in axes:
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        free = tuple(a for a in mesh_axes if a not in taken)
        taken.update(free)
        spec.append(free[0] if len(free) == 1 else (free or None))
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules table applied on it."""

    mesh: Mesh
    rules: Rules
    name: str = "custom"

    def __hash__(self) -> int:
        # Hashable despite the rules mapping: an execution plan holding a layout is a static
        # attribute of the model's modules.
        return hash((self.mesh, self.name, tuple(sorted(self.rules.items(), key=str))))

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        return logical_to_spec(axes, self.rules)

    def sharding(self, axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes))

    def size(self, axis: str) -> int:
        return self.mesh.shape[axis]

    def batch_sharding(self) -> NamedSharding:
        """[batch, seq] input arrays: rows split over the data-parallel axes."""
        return self.sharding(("batch", None))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


# Only sharding constraints read this (`constrain`): they pin where activations live, never
# what is computed. Everything that changes the computation — context parallelism, per-device
# kernels — reads the layout of the model's execution plan (model/execution.py).
_CURRENT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


@contextlib.contextmanager
def activation_layout(layout: Layout | None) -> Iterator[None]:
    """Makes `constrain` use `layout` while tracing."""
    token = _CURRENT.set(layout)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def split_count(name: str) -> int:
    """Into how many parts the current layout splits a dimension named `name` (1 outside a
    layout)."""
    layout = _CURRENT.get()
    if layout is None:
        return 1
    spec = layout.spec((name,))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(layout.size(a) for a in axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation's sharding by logical names (a no-op outside a layout)."""
    layout = _CURRENT.get()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(axes))
