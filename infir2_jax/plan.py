"""Memory and FLOPs plan of a run, without a GPU and without allocating the model.

    python -m infir2_jax.plan --config cpt_7b [--set parallel.tensor=4 ...] [--devices 8]

Compiles the real train step (sharded state, donated, micro-batched, FP8 recipe, remat)
ahead of time against abstract inputs on fake CPU devices shaped like the mesh, then prints
per-device bytes of parameters, optimizer state and FP8 state (exact, from the shardings) and
of the step's temporaries (activations, gradients, collectives buffers: XLA's buffer
assignment of the SPMD-partitioned program), the parameter count and model FLOPs.

What it is not: XLA:CPU's buffer assignment, not the GPU compiler's. Both schedule the same
partitioned program, but XLA:GPU fuses differently, and cuDNN flash attention (GPU only)
would replace `attention_impl: chunked`'s [chunk, seq] scores. Treat the temporaries as an
estimate within roughly ±20 %, the parameter and optimizer bytes as exact.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

GiB = 1024**3


def _device_count(cfg, requested: int | None) -> int:
    sizes = [cfg.parallel.data, cfg.parallel.fsdp, cfg.parallel.tensor, cfg.parallel.context]
    return (requested or 8) if -1 in sizes else math.prod(sizes)


def plan(cfg, devices: int, out=sys.stdout) -> dict[str, float]:
    """Compiles the train step for `cfg` on `devices` fake CPU devices; returns the figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from infir2_jax.fp8 import make_gemm
    from infir2_jax.parallel import describe, make_layout
    from infir2_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from infir2_jax.train.sharding import (
        check_layout,
        jit_train_step,
        state_shardings,
        with_shardings,
    )
    from infir2_jax.train.state import new_state, split_model

    if jax.device_count() < devices:
        raise RuntimeError(
            f"{jax.device_count()} devices visible, the plan needs {devices}; run it as "
            "`python -m infir2_jax.plan` (it sets XLA_FLAGS before JAX starts)"
        )
    layout = make_layout(cfg.parallel, jax.devices()[:devices])
    check_layout(
        layout, cfg.model, cfg.train.seq_len, cfg.train.batch_size, cfg.train.micro_batches
    )
    gemm = make_gemm(cfg.fp8)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    parts = split_model(cfg.model, gemm)
    abstract = jax.eval_shape(
        functools.partial(new_state, cfg.model, cfg.train.seed, gemm, optimizer)
    )
    shardings = state_shardings(layout, parts, optimizer, abstract)
    abstract = with_shardings(abstract, shardings)
    rows, seq = cfg.train.batch_size, cfg.train.seq_len
    data = layout.batch_sharding()
    batch = {
        name: jax.ShapeDtypeStruct((rows, seq), dtype, sharding=data)
        for name, dtype in (
            ("input_ids", jnp.int32),
            ("labels", jnp.int32),
            ("loss_mask", jnp.float32),
            ("positions", jnp.int32),
            ("segment_ids", jnp.int32),
        )
    }
    step = jit_train_step(layout, shardings, parts, optimizer, schedule, cfg.train.micro_batches)
    began = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    seconds = time.perf_counter() - began
    memory = compiled.memory_analysis()

    def per_device(tree) -> float:
        total = 0
        for leaf in jax.tree.leaves(tree):
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
        return float(total)

    params, opt_state, fp8 = (
        per_device(t) for t in (abstract.params, abstract.opt_state, abstract.fp8)
    )
    temporaries = float(memory.temp_size_in_bytes)
    n_params = cfg.model.num_params
    flops_token = cfg.model.flops_per_token(seq)
    data_parallel = layout.size("data") * layout.size("fsdp")
    figures = dict(
        devices=devices,
        params=params,
        opt_state=opt_state,
        fp8_state=fp8,
        temporaries=temporaries,
        arguments=float(memory.argument_size_in_bytes),
        outputs=float(memory.output_size_in_bytes),
        aliased=float(memory.alias_size_in_bytes),
        code=float(memory.generated_code_size_in_bytes),
        # live at the peak: the donated state (inputs = outputs) + the batch + temporaries
        peak=float(memory.argument_size_in_bytes) + temporaries,
        parameters=float(n_params),
        flops_per_token=flops_token,
        flops_per_step=flops_token * rows * seq,
        compile_seconds=seconds,
    )
    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    micro_rows = rows // (data_parallel * cfg.train.micro_batches)
    lines = [
        f"plan: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{n_params / 1e9:.2f} B parameters | fp8 {cfg.fp8.recipe} | remat {cfg.model.remat} | "
        f"attention {cfg.model.attention_impl or 'default'}",
        f"mesh: {describe(layout)}",
        f"batch: {rows} × {seq} tokens per step, {cfg.train.micro_batches} micro-batches, "
        f"{micro_rows} row(s) × {seq // layout.size('context')} tokens per device per "
        "micro-batch",
        "per device:",
        f"  parameters (FP32 master) {gib(params)}",
        f"  optimizer state          {gib(opt_state)}",
        f"  FP8 state                {gib(fp8)}",
        f"  temporaries (XLA)        {gib(temporaries)}   activations, gradients, buffers",
        f"  peak                     {gib(figures['peak'])}   arguments + temporaries",
        f"model FLOPs: {flops_token / 1e9:.2f} GFLOP/token, {figures['flops_per_step'] / 1e15:.2f} "
        f"PFLOP/step ({figures['flops_per_step'] / devices / 1e12:.1f} TFLOP per device)",
        f"compiled in {seconds:.0f} s",
    ]
    print("\n".join(lines), file=out, flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infir2_jax.plan", description=__doc__)
    parser.add_argument("--config", required=True, help="a name in configs/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices of the planned job when a parallel size is -1 (default 8: one node)",
    )
    args = parser.parse_args(argv)

    from infir2_jax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
        devices = _device_count(cfg, args.devices)
        # Before JAX creates its CPU client: fake devices shaped like the job.
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
        plan(cfg, devices)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
