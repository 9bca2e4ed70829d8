"""A projection GEMM partitioned by hand: y = x @ w per device inside a shard_map.

XLA's SPMD partitioner splits ordinary ops by itself, but not a custom kernel (a Pallas call is
opaque to it: it would gather every operand onto every device). `partitioned_gemm` runs the
GEMM — forward and, through shard_map's autodiff, backward — on each device's shards, placed
as the rules table places the surrounding activations and weights:

    x [tokens, in]   tokens split like the activations' (batch, inner_seq); `in` split like
                     the activation that feeds this projection (row-parallel: over tensor)
    w [in, out]      `in` as x's, `out` like the projection's output activation (column-
                     parallel: over tensor); an FSDP-sharded weight arrives as its shard and
                     the GEMM gathers it (`GatheredWeight`: FP8 residuals per shard)
    y [tokens, out]  partial sums over a split `in` are added (psum), as Megatron's
                     row-parallel layers do; shard_map's transpose adds the cotangents of x
                     and w over the axes they are replicated on (dgrad / wgrad reductions).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class GatheredWeight:
    """A weight that arrives in the shard_map split along `dim` over mesh `axes` (FSDP) but
    that the GEMM needs whole there. The GEMM gathers it itself, so that what its backward
    pass keeps is this device's slice of the FP8 copy (gathered again, in FP8, when needed:
    InfiR2's "FP8 param gather"), and wgrad leaves as this device's slice of the sum
    (a reduce-scatter). Hashable: a static argument of the GEMM's custom VJP."""

    dim: int
    axes: tuple[str, ...]

    def gather(self, a: jax.Array) -> jax.Array:
        return jax.lax.all_gather(a, self.axes, axis=self.dim, tiled=True)

    def local(self, a: jax.Array) -> jax.Array:
        """This device's slice of a whole (gathered) array."""
        n = a.shape[self.dim] // jax.lax.axis_size(self.axes)
        start = jax.lax.axis_index(self.axes) * n
        return jax.lax.dynamic_slice_in_dim(a, start, n, self.dim)

    def reduce_scatter(self, a: jax.Array) -> jax.Array:
        return jax.lax.psum_scatter(a, self.axes, scatter_dimension=self.dim, tiled=True)


def _weight_split(
    layout: Layout, axes: tuple[str, str], gemm_w_spec: PartitionSpec
) -> tuple[PartitionSpec, GatheredWeight | None]:
    """(the weight's in_spec: as its parameter is sharded, how to make it whole where the GEMM
    needs it whole). Only a dimension the GEMM keeps whole may be split (FSDP)."""
    param_spec = layout.spec(axes)
    gathered = None
    for dim, (have, need) in enumerate(zip(param_spec, gemm_w_spec, strict=True)):
        have, need = _mesh_axes(have), _mesh_axes(need)
        if have == need:
            continue
        if need or gathered is not None:
            raise ValueError(
                f"rules table {layout.name!r} shards weight {axes} as {param_spec}; the "
                f"partitioned GEMM needs {gemm_w_spec} (only one whole dimension may be split)"
            )
        gathered = GatheredWeight(dim, have)
    return param_spec, gathered


def _weight_splits(layout: Layout, axes, specs) -> tuple[tuple, tuple]:
    """(in_specs, GatheredWeight or None) of each weight, from its axes and `gemm_specs`."""
    splits = [_weight_split(layout, a, spec[1]) for a, spec in zip(axes, specs, strict=True)]
    return tuple(s for s, _ in splits), tuple(g for _, g in splits)


def partitioned_gemm(
    gemm: Callable[..., tuple[jax.Array, ...]],
    x: jax.Array,
    ws: tuple[jax.Array, ...],
    axes: tuple[tuple[str, str], ...],
    layout: Layout,
    *,
    replicated: tuple = (),
    per_device: tuple = (),
    check_vma: bool = True,
) -> tuple[jax.Array, ...]:
    """gemm(x, ws, gathered, *replicated, *per_device) -> one [tokens, out_i] per weight, run
    per device on its shards (see the module docstring). The weights share the input x, so
    their `in` axes must place it alike. Each weight enters as its parameter is sharded;
    `gathered[i]` (a GatheredWeight or None) tells the GEMM how to make it whole.
    Extra inputs (a recipe's FP8 state): `replicated` pytrees reach every device whole;
    `per_device` pytrees have a leading axis of one row per device, and each device gets its
    row ([1, ...]). `check_vma=False` for GEMMs whose results are not typed with the mesh
    axes they vary over (see jax.shard_map)."""
    if layout.mesh.size == 1:
        return gemm(x, ws, (None,) * len(ws), *replicated, *per_device)
    specs = [gemm_specs(layout, a) for a in axes]
    x_spec, _, _, contracted = specs[0]
    if any(spec[0] != x_spec for spec in specs):
        raise ValueError(f"projections {axes} share an input but split it differently")
    w_specs, gathered = _weight_splits(layout, axes, specs)

    def local(x_shard: jax.Array, w_shards: tuple[jax.Array, ...], *extra) -> tuple:
        ys = gemm(x_shard, w_shards, gathered, *extra)
        return tuple(jax.lax.psum(y, contracted) if contracted else y for y in ys)

    return jax.shard_map(
        local,
        mesh=layout.mesh,
        in_specs=(
            x_spec,
            tuple(w_specs),
            *(PartitionSpec() for _ in replicated),
            *(PartitionSpec(layout.mesh.axis_names) for _ in per_device),
        ),
        out_specs=tuple(s[2] for s in specs),
        check_vma=check_vma,
    )(x, tuple(ws), *replicated, *per_device)


def partitioned_mlp(
    mlp: Callable[..., jax.Array],
    x: jax.Array,
    ws: tuple[jax.Array, jax.Array, jax.Array],
    axes: tuple[tuple[str, str], ...],
    layout: Layout,
) -> jax.Array:
    """mlp(x, (w_gate, w_up, w_down), gathered) -> [tokens, out], a whole MLP block per device
    (as `partitioned_gemm` runs one projection): gate and up column-parallel, their output
    (and SwiGLU's) split like `act_mlp`, down row-parallel with its partial sums added."""
    if layout.mesh.size == 1:
        return mlp(x, ws, (None,) * len(ws))
    specs = [gemm_specs(layout, a) for a in axes]
    (x_spec, _, h_spec, split_gate), (up_x_spec, _, up_spec, split_up), down = specs
    down_x_spec, _, y_spec, contracted = down
    # SwiGLU runs on each device's gate and up: they must be whole sums (no split contraction),
    # split as the down projection's input is.
    if split_gate or split_up or not (x_spec == up_x_spec and h_spec == up_spec == down_x_spec):
        raise ValueError(
            f"MLP projections {axes}: gate/up outputs {h_spec}, {up_spec} (contracted over "
            f"mesh axes {split_gate or split_up or 'none'}) do not feed the down projection "
            f"as it is split ({down_x_spec})"
        )
    w_specs, gathered = _weight_splits(layout, axes, specs)

    def local(x_shard: jax.Array, w_shards: tuple[jax.Array, ...]) -> jax.Array:
        y = mlp(x_shard, w_shards, gathered)
        return jax.lax.psum(y, contracted) if contracted else y

    return jax.shard_map(
        local, mesh=layout.mesh, in_specs=(x_spec, tuple(w_specs)), out_specs=y_spec
    )(x, tuple(ws))
