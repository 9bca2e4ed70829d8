"""Memory and FLOPs plan of a run, without a GPU and without allocating the model.

    python -m infir2_jax.plan --config cpt_7b [--set parallel.tensor=4 ...] [--devices 8]
        [--target cpu|h100|h200] [--json] [--dump-hlo FILE]

Compiles the real train step (sharded state, donated, micro-batched, FP8 recipe, remat)
ahead of time against abstract inputs on devices shaped like the mesh, then prints per-device
bytes of parameters, optimizer state and FP8 state (exact, from the shardings) and of the
step's temporaries (activations, gradients, collectives buffers: XLA's buffer assignment of
the SPMD-partitioned program), the parameter count and model FLOPs.

--target cpu (default): fake CPU devices, XLA:CPU's buffer assignment
(`execution.attention_impl: auto` plans chunked XLA attention there, where a GPU runs flash
attention). XLA:GPU fuses
differently: treat the temporaries as an estimate within roughly ±20 %, the parameter and
optimizer bytes as exact.
--target h100 / h200: compile-only GPU devices from XLA's target description (needs
`pip install -r requirements-gpu-compile.txt`, no GPU): XLA:GPU's own pipeline and buffer
assignment, plus a census of the optimized program's GEMMs and kernels (FP8 cuBLASLt GEMMs,
BF16 and FP32 GEMMs, attention and Pallas kernels, [seq, seq] buffer shapes), compiled as on
that GPU (`execution.attention_impl: auto` resolves for it). Nothing is autotuned (Triton GEMMs
are off, so every GEMM is a cuBLAS call) and cuDNN/cuBLAS workspaces are not counted.
--json prints the figures as one JSON object; --dump-hlo writes the optimized HLO text.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time

GiB = 1024**3


def _device_count(cfg, requested: int | None) -> int:
    sizes = [cfg.parallel.data, cfg.parallel.fsdp, cfg.parallel.tensor, cfg.parallel.context]
    return (requested or 8) if -1 in sizes else math.prod(sizes)


def plan(
    cfg,
    devices: int,
    out=sys.stdout,
    *,
    target: str = "cpu",
    dump_hlo: str | None = None,
    as_json: bool = False,
) -> dict:
    """Compiles the train step for `cfg` on `devices` devices of `target` (fake CPU devices,
    or compile-only GPUs); prints and returns the figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from infir2_jax.fp8 import te_deviceless
    from infir2_jax.gpu_target import census, gpu_devices, square_buffers
    from infir2_jax.kernels.cudnn_attention import compile_target
    from infir2_jax.model.parts import split_model
    from infir2_jax.parallel import describe, make_layout
    from infir2_jax.target import Target
    from infir2_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from infir2_jax.train.setup import resolve_run_plan
    from infir2_jax.train.sharding import (
        check_layout,
        jit_train_step,
        state_shardings,
        with_shardings,
    )
    from infir2_jax.train.state import new_state

    if target == "cpu":
        if jax.device_count() < devices:
            raise RuntimeError(
                f"{jax.device_count()} devices visible, the plan needs {devices}; run it as "
                "`python -m infir2_jax.plan` (it sets XLA_FLAGS before JAX starts)"
            )
        device_list = jax.devices()[:devices]
    else:
        device_list = gpu_devices(target, devices)
    layout = make_layout(cfg.parallel, device_list)
    check_layout(
        layout, cfg.model, cfg.train.seq_len, cfg.train.batch_size, cfg.train.micro_batches
    )
    compiled_for = Target.named(target)
    if cfg.fp8.recipe.startswith("te_"):
        # TransformerEngine imports and traces here only with the compile-only stand-ins for
        # the CUDA driver (a no-op where a real driver is present).
        major, minor = compiled_for.capability or (9, 0)
        te_deviceless.enable(10 * major + minor)
    # What runs on the target decides `attention_impl: auto` (cuDNN's packed flash attention
    # on Hopper), the FP8 kernels and TE's implementation: resolved for it.
    _, exec_plan = resolve_run_plan(cfg, layout, compiled_for)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    parts = split_model(cfg.model, exec_plan)
    abstract = jax.eval_shape(
        functools.partial(new_state, cfg.model, cfg.train.seed, exec_plan, optimizer)
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
    # JAX's cuDNN binding checks the local device (this CPU) while tracing: compile-only, make
    # it check the target.
    on_target = (
        compile_target(compiled_for.capability)
        if compiled_for.is_cuda
        else contextlib.nullcontext()
    )
    attention = exec_plan.attention
    with on_target:
        began = time.perf_counter()
        compiled = step.lower(abstract, batch).compile()
        seconds = time.perf_counter() - began
    memory = compiled.memory_analysis()
    hlo = compiled.as_text() if (target != "cpu" or dump_hlo) else ""
    if dump_hlo:
        with open(dump_hlo, "w") as f:
            f.write(hlo)

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
        target=target,
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
        attention=attention or "xla",
    )
    if target != "cpu":
        figures["census"] = census(hlo).as_dict()
        figures["census"]["seq_by_seq_buffers"] = square_buffers(hlo, seq // layout.size("context"))
    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    micro_rows = rows // (data_parallel * cfg.train.micro_batches)
    lines = [
        f"plan: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{n_params / 1e9:.2f} B parameters | fp8 {cfg.fp8.recipe} | "
        f"remat {cfg.execution.remat} | attention {exec_plan.describe_attention()}",
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
        f"compiled for {target} in {seconds:.0f} s",
    ]
    if target != "cpu":
        c = figures["census"]
        lines += [
            "GEMM census (optimized HLO; loop bodies once): "
            f"{c['fp8_gemms']} FP8 cuBLASLt ({c['fp8_gemms_f32_out']} with FP32 output), "
            f"{c['bf16_gemms']} BF16, {c['f32_gemms']} FP32-operand, {c['xla_dots']} XLA dots; "
            f"{c['attention_kernels']} cuDNN attention, {c['pallas_kernels']} Pallas/Triton "
            f"kernels; {c['seq_by_seq_buffers']} [seq, seq] buffer shapes",
        ]
        if c["te_gemms"] or c["te_quantize"]:
            lines.append(
                f"TransformerEngine: {c['te_gemms']} GEMM calls ({c['te_fp8_gemms']} FP8), "
                f"{c['te_quantize']} quantize kernels (counted in the GEMMs above too)"
            )
    if not as_json:
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
    parser.add_argument(
        "--target",
        default="cpu",
        choices=["cpu", "h100", "h200"],
        help="compile for fake CPU devices (default) or compile-only H100/H200 GPUs",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dump-hlo", metavar="FILE", help="write the optimized HLO text")
    args = parser.parse_args(argv)
    # JAX runs on the CPU, for every target; otherwise it would try to start the CUDA plugin on
    # a machine without a GPU and, failing, drop the very plugin the GPU targets compile with.
    # (jax read JAX_PLATFORMS when the package imported it: set the option itself.)
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")

    from infir2_jax.config import ConfigError, load_config
    from infir2_jax.gpu_target import COMPILE_FLAGS, GpuTargetError

    try:
        cfg = load_config(args.config, args.set)
        devices = _device_count(cfg, args.devices)
        # Before JAX creates its clients: fake CPU devices shaped like the job, or (GPU targets,
        # compiled without autotuning) no Triton GEMMs.
        flags = os.environ.get("XLA_FLAGS", "")
        extra = (
            f"--xla_force_host_platform_device_count={devices}"
            if args.target == "cpu"
            else COMPILE_FLAGS
        )
        os.environ["XLA_FLAGS"] = f"{flags} {extra}"
        figures = plan(cfg, devices, target=args.target, dump_hlo=args.dump_hlo, as_json=args.json)
    except (ConfigError, ValueError, GpuTargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
