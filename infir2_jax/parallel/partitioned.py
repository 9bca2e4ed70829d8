"""A projection GEMM partitioned by hand: y = x @ w per device inside a shard_map.

XLA's SPMD partitioner splits ordinary ops by itself, but not a custom kernel (a Pallas call is
opaque to it: it would gather every operand onto every device). `partitioned_gemm` runs the
GEMM — forward and, through shard_map's autodiff, backward — on each device's shards, placed
as the rules table places the surrounding activations and weights:

    x [tokens, in]   tokens split like the activations' (batch, inner_seq); `in` split like
                     the activation that feeds this projection (row-parallel: over tensor)
    w [in, out]      `in` as x's, `out` like the projection's output activation (column-
                     parallel: over tensor); FSDP-sharded weights arrive gathered
    y [tokens, out]  partial sums over a split `in` are added (psum), as Megatron's
                     row-parallel layers do; shard_map's transpose adds the cotangents of x
                     and w over the axes they are replicated on (dgrad / wgrad reductions).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from infir2_jax.parallel.rules import Layout

# A weight's logical axis -> the logical axis of the activation dimension it meets.
ACTIVATION_AXIS = {
    "embed": None,  # hidden-size activations are whole between blocks' GEMMs (SP gathers them)
    "heads": "act_heads",
    "kv_heads": "act_kv_heads",
    "mlp": "act_mlp",
    "vocab": "act_vocab",
}


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def gemm_specs(
    layout: Layout, axes: tuple[str, str]
) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec, tuple[str, ...]]:
    """(x spec, w spec, y spec, mesh axes the contraction is split over) for a projection whose
    weight has logical axes `axes` = (in, out)."""
    batch, seq = layout.spec(("batch", "inner_seq"))
    tokens = _mesh_axes(batch) + _mesh_axes(seq)  # x2d flattens [batch, seq] batch-major
    k_name, n_name = (ACTIVATION_AXIS[a] for a in axes)
    k, n = layout.spec((k_name, n_name))
    if set(tokens) & (set(_mesh_axes(k)) | set(_mesh_axes(n))):
        raise ValueError(f"rules table {layout.name!r} splits tokens and {axes} over one axis")
    token_spec = tokens or None
    return (
        PartitionSpec(token_spec, k),
        PartitionSpec(k, n),
        PartitionSpec(token_spec, n),
        _mesh_axes(k),
    )


def partitioned_gemm(
    gemm: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    w: jax.Array,
    axes: tuple[str, str],
    layout: Layout,
) -> jax.Array:
    """gemm(x, w) run per device on its shards (see the module docstring)."""
    if layout.mesh.size == 1:
        return gemm(x, w)
    x_spec, w_spec, y_spec, contracted = gemm_specs(layout, axes)

    def local(x_shard: jax.Array, w_shard: jax.Array) -> jax.Array:
        y = gemm(x_shard, w_shard)
        return jax.lax.psum(y, contracted) if contracted else y

    return jax.shard_map(local, mesh=layout.mesh, in_specs=(x_spec, w_spec), out_specs=y_spec)(x, w)
