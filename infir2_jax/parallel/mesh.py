"""The device mesh from `parallel.*`.

Axes are always (data, fsdp, tensor, context). This foundation shards the batch over data
(and fsdp) and replicates parameters; FSDP, tensor and context parallelism need the logical
sharding rules that are not built yet, so sizes > 1 for them are rejected with that reason.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infir2_jax.config import ConfigError, ParallelConfig

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
            raise ConfigError(f"parallel: {num_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(
            f"parallel: data×fsdp×tensor×context = {int(np.prod(sizes))}, "
            f"but there are {num_devices} devices"
        )
    for axis, size in zip(MESH_AXES[1:], sizes[1:], strict=True):
        if size > 1:
            raise ConfigError(
                f"parallel.{axis}={size}: not supported yet (needs the logical sharding rules); "
                "use parallel.data"
            )
    return tuple(sizes)


def make_mesh(cfg: ParallelConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
