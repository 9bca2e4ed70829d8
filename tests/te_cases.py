"""TransformerEngine recipes sharded vs one device, in a subprocess with 8 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/te_cases.py OUT.json

TE runs here through the compile-only setup (infir2_jax.fp8.te_deviceless) and, on the CPU,
TE's own pure-JAX implementation of its recipes. For two meshes of tests/sharded_cases.py
that between them split over every axis (data × tensor × context with sequence parallelism;
FSDP × tensor) and both TE recipes: one train step on the mesh against the same step on one
device. Writes the measured differences; tests/test_te.py asserts on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax.fp8 import te_deviceless  # noqa: E402

te_deviceless.enable()

from sharded_cases import CASES, packed_batch, rel_diff, sharded_steps  # noqa: E402

TE_CASES = [case for case in CASES if case[0] in ("tensor_sequence_context", "fsdp_tensor")]


def _rows(fp8, name: str, rows: slice) -> list[np.ndarray]:
    """Rows (x, w | g) of every GEMM's TE state `name` (fp8_history [..., 3, H] or fp8_scale
    [..., 3])."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(fp8):
        if jax.tree_util.keystr(path).endswith(f"['{name}']"):
            leaf = np.asarray(leaf)
            out.append(leaf[..., rows, :] if name == "fp8_history" else leaf[..., rows])
    return out


def compare_steps() -> list[dict]:
    batch = packed_batch()
    results = []
    for recipe in ("te_current", "te_delayed"):
        for case, fp8, ref_fp8 in sharded_steps(recipe, TE_CASES, batch):
            case["fp8_states"] = len(jax.tree.leaves(fp8))
            if ref_fp8:
                forward = slice(0, 2)  # x and w: maxima of forward values, exact
                case["forward_amax"] = rel_diff(
                    _rows(fp8, "fp8_history", forward), _rows(ref_fp8, "fp8_history", forward)
                )
                case["forward_scale"] = rel_diff(
                    _rows(fp8, "fp8_scale", forward), _rows(ref_fp8, "fp8_scale", forward)
                )
                # g: maxima of gradients, which FP8 rounding in the backward moves a little
                case["grad_amax"] = rel_diff(
                    _rows(fp8, "fp8_history", slice(2, 3)),
                    _rows(ref_fp8, "fp8_history", slice(2, 3)),
                )
                case["amax_observed"] = min(
                    float(h[..., -1].min()) for h in _rows(fp8, "fp8_history", slice(0, 3))
                )
            results.append(case)
            print(json.dumps(case), flush=True)
    return results


if __name__ == "__main__":
    assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"
    Path(sys.argv[1]).write_text(json.dumps({"steps": compare_steps()}, indent=1))
