"""Device mesh, logical-axis rules, context-parallel attention, multi-host start-up."""

from infir2_jax.parallel.mesh import MESH_AXES, describe, make_layout, make_mesh
from infir2_jax.parallel.rules import RULES, Layout, activation_layout, constrain, logical_to_spec

__all__ = [
    "MESH_AXES",
    "RULES",
    "Layout",
    "activation_layout",
    "constrain",
    "describe",
    "logical_to_spec",
    "make_layout",
    "make_mesh",
]
