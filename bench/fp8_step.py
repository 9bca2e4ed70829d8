"""Train-step time, TFLOPS and memory per FP8 recipe.

    python bench/fp8_step.py --tiny                       # CPU smoke size (tiny preset)
    python bench/fp8_gpu.py                                # GPU: 1.5B, 8k context, batch 2

Each recipe runs in its own process (so peak device memory is its own). Reported:
- step: median wall time of `--steps` jitted train steps (after 2 warm-up steps);
- TFLOPS: model FLOPs / step time, with ModelConfig.flops_per_token:
  6 × (every matmul weight, lm_head included) + 6 × layers × heads × head_dim × seq
  (causal attention), times batch × seq tokens — the same convention as InfiR2's table;
- compiled temp / argument bytes: XLA's memory_analysis() of the compiled step;
- peak: the device allocator's peak_bytes_in_use (GPU; not reported by the CPU backend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = ("none", "delayed", "current", "rowwise", "blockwise")
# TransformerEngine's recipes join the default list where TE-JAX is installed
# (launch/install_te_jax.sh); on a GPU TE loads as it is.
TE_RECIPES = ("te_current", "te_delayed")


def default_recipes() -> tuple[str, ...]:
    from infir2_jax.fp8.te import te_installed

    return RECIPES + (TE_RECIPES if te_installed() else ())


def measure(recipe: str, preset: str, seq: int, batch: int, steps: int, remat: str) -> dict:
    import jax
    import numpy as np

    from infir2_jax.config import FP8Config, OptimConfig
    from infir2_jax.fp8 import make_gemm
    from infir2_jax.model import ExecutionConfig, resolve_plan
    from infir2_jax.model import preset as get_preset
    from infir2_jax.model.parts import init_params, split_model
    from infir2_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from infir2_jax.train.state import init_state, make_train_step

    cfg = get_preset(preset).replace(dtype="bfloat16", param_dtype="float32")
    plan = resolve_plan(cfg, ExecutionConfig(remat=remat), gemm=make_gemm(FP8Config(recipe=recipe)))
    optim = OptimConfig(lr=1e-5, warmup_steps=0)
    optimizer = make_optimizer(optim, 1000)
    step_fn = jax.jit(
        make_train_step(split_model(cfg, plan), optimizer, learning_rate_schedule(optim, 1000)),
        donate_argnums=0,
    )
    state = jax.jit(lambda: init_state(*init_params(cfg, 0, plan), optimizer))()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq + 1))
    batch_arrays = jax.device_put(
        {
            "input_ids": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(seq), (batch, seq)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "loss_mask": np.ones((batch, seq), np.int32),
        }
    )
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    for _ in range(2):
        state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "recipe": recipe,
        "step_ms": step_s * 1e3,
        "tflops": cfg.flops_per_token(seq) * batch * seq / step_s / 1e12,
        "compile_s": compile_s,
        "temp_gib": memory.temp_size_in_bytes / 2**30 if memory else None,
        "args_gib": memory.argument_size_in_bytes / 2**30 if memory else None,
        "peak_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
        "loss": float(metrics["loss"]),
        "device": jax.devices()[0].device_kind,
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(defaults: dict | None = None) -> None:
    defaults = defaults or {}
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=defaults.get("preset", "qwen2.5-1.5b"))
    parser.add_argument("--seq", type=int, default=defaults.get("seq", 8192))
    parser.add_argument("--batch", type=int, default=defaults.get("batch", 2))
    parser.add_argument("--steps", type=int, default=defaults.get("steps", 10))
    parser.add_argument("--remat", default=defaults.get("remat", "full"))
    parser.add_argument("--recipes", default=",".join(default_recipes()))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke size: tiny preset, seq 256")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child process: one recipe
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.seq, args.steps = "tiny", 256, 5
    if args.only:
        print(
            json.dumps(
                measure(args.only, args.preset, args.seq, args.batch, args.steps, args.remat)
            )
        )
        return

    rows = []
    for recipe in args.recipes.split(","):
        cmd = [sys.executable, __file__, "--only", recipe, "--preset", args.preset,
               "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
               "--remat", args.remat]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode:
            print(f"{recipe}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{recipe}: {rows[-1]['step_ms']:.1f} ms", file=sys.stderr, flush=True)

    print(f"{args.preset}, seq {args.seq}, micro-batch {args.batch}, remat {args.remat}, "
          f"{rows[0]['device'] if rows else '?'}")  # fmt: skip
    columns = ["recipe", "step (ms)", "vs BF16", "TFLOPS", "peak (GiB)", "XLA temp (GiB)",
               "args (GiB)", "compile (s)", "loss"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    base = next((r["step_ms"] for r in rows if r["recipe"] == "none"), None)
    for r in rows:
        ratio = f"{r['step_ms'] / base:.2f}x" if base else "n/a"
        cells = [r["recipe"], f"{r['step_ms']:.1f}", ratio, f"{r['tflops']:.3g}",
                 _fmt(r["peak_gib"], ".2f"), _fmt(r["temp_gib"], ".3f"),
                 _fmt(r["args_gib"], ".3f"), f"{r['compile_s']:.1f}",
                 f"{r['loss']:.4f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
