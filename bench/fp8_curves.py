"""Loss curves of every FP8 recipe against BF16 on the tiny model (CPU), same data and seed.

    python bench/fp8_curves.py [--steps 300] [--batch 16] [--seq 64] [--out curves.json]
    python bench/fp8_curves.py --recipes none,current,te_current,te_delayed --steps 200

Also trains BF16 with another seed, as a yardstick for how far two equally good runs drift
apart. Reports the loss at a few steps and the final loss (mean of the last 20 steps)
relative to BF16. TransformerEngine's recipes need TE-JAX (launch/install_te_jax.sh); on a
machine without a GPU they run TE's own pure-JAX implementation, loaded through the
compile-only setup (infir2_jax.fp8.te_deviceless).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax.config import load_config  # noqa: E402
from infir2_jax.train import train  # noqa: E402

RECIPES = ("none", "delayed", "current", "rowwise", "blockwise")


def run_curves(recipes, steps: int, batch: int, seq: int, extra=(), control_seed: int | None = 1):
    """{label: [loss per step]} for each recipe (and a BF16 run with another seed)."""
    runs = [(r, [f"fp8.recipe={r}"]) for r in recipes]
    if control_seed is not None:
        runs.append(
            (f"none (seed {control_seed})", ["fp8.recipe=none", f"train.seed={control_seed}"])
        )
    curves = {}
    root = Path(tempfile.mkdtemp())
    for i, (label, overrides) in enumerate(runs):
        cfg = load_config(
            "tiny_cpt",
            [f"train.run_dir={root / str(i)}", f"train.steps={steps}", f"train.batch_size={batch}",
             f"train.seq_len={seq}", "train.log_every=1", "checkpoint.every=100000", *extra,
             *overrides],
        )  # fmt: skip
        start = time.perf_counter()
        curves[label] = [m["loss"] for m in train(cfg, out=io.StringIO())]
        print(f"{label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return curves


def final_loss(curve: list[float], last: int = 20) -> float:
    return sum(curve[-last:]) / len(curve[-last:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--out", help="write the curves as JSON")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()
    recipes = ["none", *(r for r in args.recipes.split(",") if r != "none")]  # the yardstick
    if any(r.startswith("te_") for r in recipes):
        from infir2_jax.fp8 import te_deviceless

        te_deviceless.enable()  # no-op where a CUDA driver is present
    curves = run_curves(recipes, args.steps, args.batch, args.seq, args.set)
    if args.out:
        Path(args.out).write_text(json.dumps(curves))
    marks = [1, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps]
    base = final_loss(curves["none"])
    print("| run | " + " | ".join(f"step {m}" for m in marks) + " | final (last 20) | vs BF16 |")
    print("|---|" + "---|" * (len(marks) + 2))
    for label, curve in curves.items():
        final = final_loss(curve)
        cells = [f"{curve[m - 1]:.3f}" for m in marks]
        print(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {final:.4f} | {100 * (final / base - 1):+.2f}% |"
        )


if __name__ == "__main__":
    main()
