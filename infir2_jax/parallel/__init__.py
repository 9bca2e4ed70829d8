"""Device mesh and shardings."""

from infir2_jax.parallel.mesh import MESH_AXES, batch_sharding, make_mesh, replicated

__all__ = ["MESH_AXES", "batch_sharding", "make_mesh", "replicated"]
