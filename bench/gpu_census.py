"""What XLA:GPU makes of every FP8 recipe on InfiR2's three benchmark settings, compiled for an
H100 on this machine (no GPU): GEMM census, per-device peak memory, and the planner's projected
step time (a roofline of the optimized HLO, infir2_jax/roofline.py; not a measurement) with its
ratio to the BF16 step's (run `none` first for the ratios).

    pip install -r requirements-gpu-compile.txt
    python bench/gpu_census.py [--target h100] [--recipes none,current,...] [--settings ...]

Each case is one `python -m infir2_jax.plan --target h100 --json` process (JAX's device set is
fixed per process). Prints a Markdown table for BENCHMARKS.md. Counts are per loop body (the
layer scan's forward and backward bodies each appear once in the optimized module).
TransformerEngine's recipes (`--recipes ...,te_current,te_delayed`) need TE-JAX installed
(launch/install_te_jax.sh); the planner compiles them with TE's compile-only setup.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3
RECIPES = ("none", "current", "delayed", "rowwise", "blockwise")
# InfiR2's single-node settings (docs/recipe.md, "Published results"): name -> (config, devices,
# overrides, InfiR2 peak GB BF16 / FP8).
SETTINGS = {
    "1.5B 8k MBS2 TP1": ("cpt_1p5b", 1, ["parallel.tensor=1", "train.seq_len=8192",
                         "train.batch_size=2", "train.micro_batches=1"], (68.1, 58.3)),
    # One 8-GPU node as InfiR2 measured it (DP 8, optimizer sharded: here FSDP 8), MBS 2, and
    # no recomputation, so activations dominate as in their 68 GB BF16 peak.
    "1.5B 8k node no-remat": ("cpt_1p5b", 8, ["parallel.tensor=1", "parallel.data=1",
                                    "parallel.fsdp=8", "train.seq_len=8192",
                                    "train.batch_size=16", "train.micro_batches=1",
                                    "execution.remat=none"], (68.1, 58.3)),
    "1.5B 32k TP2": ("cpt_1p5b", 2, ["parallel.tensor=2", "train.batch_size=1",
                     "train.micro_batches=1"], (57.8, 51.7)),
    "7B 32k TP4": ("cpt_7b", 4, ["parallel.tensor=4", "train.batch_size=1",
                   "train.micro_batches=1"], (78.1, 67.4)),
}  # fmt: skip


def plan_json(target: str, config: str, devices: int, overrides: list[str]) -> dict:
    sets = [a for o in [*overrides, "train.init_from=null"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "infir2_jax.plan", "--config", config, "--target", target,
           "--devices", str(devices), "--json", *sets]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="h100", choices=["h100", "h200"])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config overrides for every case")  # fmt: skip
    args = parser.parse_args()
    rows = [
        "| setting | fp8.recipe | FP8 GEMMs (FP32 out) | BF16 GEMMs | FP32-operand GEMMs "
        "| Pallas | TE GEMMs / quantize | attention (cuDNN calls) | [seq, seq] shapes "
        "| peak / device | vs BF16 | projected step | step vs BF16 | InfiR2 BF16 / FP8 | compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in args.settings.split(","):
        config, devices, overrides, published = SETTINGS[setting]
        bf16_peak = bf16_step = None
        for recipe in args.recipes.split(","):
            began = time.perf_counter()
            f = plan_json(
                args.target, config, devices, [*overrides, *args.set, f"fp8.recipe={recipe}"]
            )
            c = f["census"]
            bf16_peak = f["peak"] if recipe == "none" else bf16_peak
            ratio = f"{f['peak'] / bf16_peak:.2f}×" if bf16_peak else "—"
            step = f["projection"]["total_ms"]
            bf16_step = step if recipe == "none" else bf16_step
            step_ratio = f"{step / bf16_step:.2f}×" if bf16_step else "—"
            rows.append(
                f"| {setting} | {recipe} | {c['fp8_gemms']} ({c['fp8_gemms_f32_out']}) "
                f"| {c['bf16_gemms']} | {c['f32_gemms']} | {c['pallas_kernels']} "
                f"| {c['te_gemms']} / {c['te_quantize']} "
                f"| {f['attention']} ({c['attention_kernels']}) | {c['seq_by_seq_buffers']} "
                f"| {f['peak'] / GiB:.1f} GiB | {ratio} | {step:.0f} ms | {step_ratio} "
                f"| {published[0]} / {published[1]} GB "
                f"| {time.perf_counter() - began:.0f} s |"
            )
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
