"""The device mesh and the sharding layout from `parallel.*`.

Axes are always (data, fsdp, tensor, context), outermost first: `context` and `tensor` are the
innermost so their collectives (per-layer all-gathers / reduce-scatters, every step) stay on
the NVLink of one node, while data and fsdp cross nodes.
"""

from __future__ import annotations

from typing import Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from infir2_jax.errors import ConfigError
from infir2_jax.parallel.rules import RULES, Layout, auto_rules, mesh_axes_of


class ParallelConfig(Protocol):
    """What the mesh reads of `config.ParallelConfig` (`parallel.*`)."""

    data: int
    fsdp: int
    tensor: int
    context: int
    rules: str


MESH_AXES = ("data", "fsdp", "tensor", "context")


def mesh_shape(cfg: ParallelConfig, num_devices: int) -> tuple[int, ...]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.context]
    if sizes.count(-1) > 1:
        raise ConfigError("parallel: at most one of data/fsdp/tensor/context may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        given = dict(zip(MESH_AXES, sizes, strict=True))
        raise ConfigError(f"parallel: sizes must be positive or -1, got {given}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(_misfit(cfg, known, "does not divide", num_devices))
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(_misfit(cfg, known, "is not", num_devices))
    return tuple(sizes)


def _misfit(cfg: ParallelConfig, product: int, problem: str, num_devices: int) -> str:
    """Names the sizes that do not fit the devices and the overrides that would, e.g.
    `parallel: tensor 4 × context 2 = 8 does not divide the 1 device here (...); to run
    here: --set parallel.tensor=1 --set parallel.context=1`."""
    given = dict(zip(MESH_AXES, [cfg.data, cfg.fsdp, cfg.tensor, cfg.context], strict=True))
    factors = {axis: size for axis, size in given.items() if size > 1}
    named = " × ".join(f"{axis} {size}" for axis, size in factors.items()) or "1"
    fix = {axis: 1 for axis in factors}
    if -1 not in given.values():  # data absorbs the devices left over
        fix["data"] = -1
    sets = " ".join(f"--set parallel.{axis}={size}" for axis, size in fix.items())
    plural = "device" if num_devices == 1 else "devices"
    return (
        f"parallel: {named} = {product} {problem} the {num_devices} {plural} here (data × "
        f"fsdp × tensor × context must use them all; -1 takes the rest); to run here: {sets}"
    )


def make_mesh(cfg: ParallelConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    # Hosts own contiguous device blocks (jax.devices() is ordered by process), so the outer
    # axes span hosts and the inner ones stay within a host.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def make_layout(cfg: ParallelConfig, devices: list | None = None) -> Layout:
    """The mesh plus the rules table `parallel.rules` (auto: chosen from the mesh)."""
    mesh = make_mesh(cfg, devices)
    name = auto_rules(mesh.shape) if cfg.rules == "auto" else cfg.rules
    if name not in RULES:
        raise ConfigError(f"parallel.rules={cfg.rules!r}: known tables {['auto', *RULES]}")
    unused = [a for a in MESH_AXES if mesh.shape[a] > 1 and a not in mesh_axes_of(RULES[name])]
    if unused:
        axis = unused[0]
        raise ConfigError(
            f"parallel.{axis}={mesh.shape[axis]} but the rules table {name!r} never splits "
            f"anything over {axis!r}; pick a table that does (parallel.rules, e.g. auto)"
        )
    return Layout(mesh, RULES[name], name)


def describe(layout: Layout) -> str:
    sizes = " × ".join(f"{a}{layout.mesh.shape[a]}" for a in MESH_AXES)
    hosts = jax.process_count()
    return f"{sizes} ({layout.mesh.size} devices, {hosts} processes), rules {layout.name}"
