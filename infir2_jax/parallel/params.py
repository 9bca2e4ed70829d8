"""Where each parameter lives on the mesh: its logical axes through the layout's rules."""

from __future__ import annotations

from typing import Any

from flax import traverse_util
from jax.sharding import NamedSharding

from infir2_jax.errors import ConfigError
from infir2_jax.parallel.rules import Layout


def param_shardings(layout: Layout, param_axes: dict[str, Any], params: dict[str, Any]) -> dict:
    """NamedSharding per parameter (nested dicts: `param_axes` leaves are logical axis names,
    `params` leaves anything with a shape); a dimension that does not split evenly is an error
    naming the parameter, its shape and the mesh axes."""
    flat_axes = traverse_util.flatten_dict(param_axes)
    flat_params = traverse_util.flatten_dict(params)
    out = {}
    for path, axes in flat_axes.items():
        shape = flat_params[path].shape
        spec = layout.spec(axes)
        for dim, (size, entry) in enumerate(zip(shape, spec, strict=False)):
            if entry is None:
                continue
            mesh_axes = (entry,) if isinstance(entry, str) else entry
            pieces = 1
            for axis in mesh_axes:
                pieces *= layout.mesh.shape[axis]
            if size % pieces:
                raise ConfigError(
                    f"parameter {'/'.join(path)} {shape}: dimension {dim} ({axes[dim]}={size}) "
                    f"does not split over {'×'.join(mesh_axes)} = {pieces} devices "
                    f"(rules {layout.name}); change parallel.* or parallel.rules"
                )
        out[path] = NamedSharding(layout.mesh, spec)
    return traverse_util.unflatten_dict(out)
