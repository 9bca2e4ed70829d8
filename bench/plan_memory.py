"""Per-device memory of the recipe CPT runs, BF16 vs FP8 blockwise, from the planner.

    python bench/plan_memory.py            # 8 fake CPU devices (one H100 node), ~2 minutes

Prints a Markdown table for BENCHMARKS.md: parameters, optimizer state, XLA temporaries and
their sum (peak) per device, next to InfiR2's published peaks (docs/recipe.md).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax.config import load_config  # noqa: E402
from infir2_jax.plan import GiB, plan  # noqa: E402

# (config, extra overrides, label, InfiR2 published peak GB BF16 / FP8)
CASES = [
    ("cpt_7b", [], "7B TP4 (data 2)", (78.1, 67.4)),
    ("cpt_7b", ["parallel.fsdp=2", "parallel.data=1"], "7B TP4 + fsdp 2", (78.1, 67.4)),
    ("cpt_1p5b", [], "1.5B TP2 (data 4)", (57.8, 51.7)),
    ("cpt_1p5b", ["parallel.fsdp=4", "parallel.data=1"], "1.5B TP2 + fsdp 4", (57.8, 51.7)),
]


def main() -> None:
    rows = [
        "| run (32k, 8 GPUs) | FP8 | params | Adam | temporaries | peak | InfiR2 peak | compile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, overrides, label, published in CASES:
        for recipe, infir2 in zip(("none", "blockwise"), published, strict=True):
            cfg = load_config(name, [*overrides, f"fp8.recipe={recipe}", "train.init_from=null"])
            log = io.StringIO()
            f = plan(cfg, 8, out=log)
            print(log.getvalue(), flush=True)
            g = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
            rows.append(
                f"| {label} | {'BF16' if recipe == 'none' else 'blockwise'} | {g(f['params'])} "
                f"| {g(f['opt_state'])} | {g(f['temporaries'])} | {g(f['peak'])} "
                f"({f['peak'] / 1e9:.1f} GB) | {infir2} GB | {f['compile_seconds']:.0f} s |"
            )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
