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
It also projects the step time on that GPU from the optimized HLO (infir2_jax/roofline.py):
total ms, its breakdown (BF16 / FP8 GEMMs, attention, memory-bound kernels, quantization
kernels, collectives, launch overhead), model TFLOPS/GPU, MFU (of the BF16 peak) and the top
kernels. A projection, not a measurement; its assumptions:
  - each kernel runs as often per step as its loops say (while trip counts, nested);
  - GEMMs (cuBLAS(Lt) calls, the FP8 ones included; Pallas FP8 GEMMs; fusions holding a dot):
    max(FLOPs / (peak of their dtype x 0.7), bytes / (HBM x 0.8));
  - cuDNN / Pallas attention: FLOPs (halved when causal) at 0.5 of the BF16 peak;
  - every other kernel: bytes in + out at 0.8 of HBM bandwidth; quantization kernels (FP8
    outputs, amax reductions, FP8 up-conversions) are counted apart (of a fusion that also
    does BF16 work, only its FP8 / integer / mask / scale outputs);
  - 3 us per kernel launch;
  - collectives: NVLink ring formulas (all-gather / reduce-scatter (n-1)/n x bytes,
    all-reduce 2(n-1)/n x bytes) at 0.8 of 450 GB/s per direction, not overlapped;
  - peaks (gpu_target.PEAKS): 989.5 / 1979 TFLOP/s dense BF16 / FP8, HBM 3.35 TB/s (H100),
    4.8 TB/s (H200).
--json prints the figures as one JSON object; --dump-hlo writes the optimized HLO text.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

from infir2_jax.cli import add_config, add_set, command_parser

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

    from infir2_jax.compat import deviceless_cudnn_attention
    from infir2_jax.fp8 import te_deviceless
    from infir2_jax.gpu_target import GpuTargetError, census, square_buffers
    from infir2_jax.roofline import project
    from infir2_jax.target import Target
    from infir2_jax.train.setup import prepare

    compiled_for = Target.named(target)
    if cfg.fp8.recipe.startswith("te_"):
        # TransformerEngine imports and traces here only with the compile-only stand-ins for
        # the CUDA driver (a no-op where a real driver is present).
        major, minor = compiled_for.capability or (9, 0)
        te_deviceless.enable(10 * major + minor)
    # The training run's own set-up, on the planned devices: what runs on the target decides
    # `attention_impl: auto` (cuDNN's packed flash attention on Hopper), the FP8 kernels and
    # TE's implementation.
    setup = prepare(cfg, devices=_plan_devices(target, devices), target=compiled_for)
    if target != "cpu" and setup.plan.attention == "cudnn" and not deviceless_cudnn_attention():
        raise GpuTargetError(
            f"--target {target}: this jax ({jax.__version__}) cannot compile cuDNN flash "
            "attention without a GPU (XLA needs a cuDNN handle to choose its engine); plan "
            "with --set execution.attention_impl=pallas, or in the jax 0.10.2 environment "
            "(requirements.txt, Python 3.11)"
        )
    compiled, seconds = _compile(cfg, setup)
    attention = setup.plan.attention
    hlo = compiled.as_text() if (target != "cpu" or dump_hlo) else ""
    if dump_hlo:
        with open(dump_hlo, "w") as f:
            f.write(hlo)
    figures = _figures(cfg, setup, compiled, target, devices, seconds, attention)
    if target != "cpu":
        seq_per_device = cfg.train.seq_len // setup.layout.size("context")
        figures["census"] = census(hlo).as_dict()
        figures["census"]["seq_by_seq_buffers"] = square_buffers(hlo, seq_per_device)
        model_flops = figures["flops_per_step"] / devices
        figures["projection"] = project(hlo, target, model_flops_per_device=model_flops).as_dict()
    if not as_json:
        report = _report(cfg, setup.layout, figures, setup.plan.describe_attention())
        print("\n".join(report), file=out, flush=True)
    return figures


def _plan_devices(target: str, devices: int) -> list:
    """`devices` fake CPU devices, or compile-only GPUs of `target`."""
    import jax

    from infir2_jax.gpu_target import gpu_devices

    if target != "cpu":
        return gpu_devices(target, devices)
    if jax.device_count() < devices:
        raise RuntimeError(
            f"{jax.device_count()} devices visible, the plan needs {devices}; run it as "
            "`python -m infir2_jax.plan` (it sets XLA_FLAGS before JAX starts)"
        )
    return jax.devices()[:devices]


def _compile(cfg, setup):
    """(compiled train step, seconds): the step the run jits, for abstract state and batch."""
    from infir2_jax.kernels.cudnn_attention import compile_target
    from infir2_jax.train.sharding import abstract_batch, jit_train_step

    batch = abstract_batch(setup.layout, cfg.train.batch_size, cfg.train.seq_len)
    step = jit_train_step(
        setup.layout, setup.state_sharding, setup.parts, setup.optimizer, setup.schedule,
        cfg.train.micro_batches,
    )  # fmt: skip
    # JAX's cuDNN binding checks the local device (this CPU) while tracing: compile-only, make
    # it check the target.
    target = setup.plan.target
    on_target = compile_target(target.capability) if target.is_cuda else contextlib.nullcontext()
    with on_target:
        began = time.perf_counter()
        compiled = step.lower(setup.abstract, batch).compile()
    return compiled, time.perf_counter() - began


def _per_device(tree) -> float:
    """Bytes of one device's shards of these arrays."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return float(total)


def _figures(cfg, setup, compiled, target, devices, seconds, attention) -> dict:
    memory = compiled.memory_analysis()
    abstract = setup.abstract
    temporaries = float(memory.temp_size_in_bytes)
    rows, seq = cfg.train.batch_size, cfg.train.seq_len
    flops_token = cfg.model.flops_per_token(seq)
    return dict(
        target=target,
        devices=devices,
        params=_per_device(abstract.params),
        opt_state=_per_device(abstract.opt_state),
        fp8_state=_per_device(abstract.fp8),
        temporaries=temporaries,
        arguments=float(memory.argument_size_in_bytes),
        outputs=float(memory.output_size_in_bytes),
        aliased=float(memory.alias_size_in_bytes),
        code=float(memory.generated_code_size_in_bytes),
        # live at the peak: the donated state (inputs = outputs) + the batch + temporaries
        peak=float(memory.argument_size_in_bytes) + temporaries,
        parameters=float(cfg.model.num_params),
        flops_per_token=flops_token,
        flops_per_step=flops_token * rows * seq,
        compile_seconds=seconds,
        attention=attention or "xla",
    )


def _report(cfg, layout, figures: dict, attention: str) -> list[str]:
    """The printed plan."""
    from infir2_jax.parallel import describe
    from infir2_jax.roofline import describe as describe_projection

    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    rows, seq = cfg.train.batch_size, cfg.train.seq_len
    data_parallel = layout.size("data") * layout.size("fsdp")
    micro_rows = rows // (data_parallel * cfg.train.micro_batches)
    n_params, flops_token = figures["parameters"], figures["flops_per_token"]
    lines = [
        f"plan: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{n_params / 1e9:.2f} B parameters | fp8 {cfg.fp8.recipe} | "
        f"remat {cfg.execution.remat} | attention {attention}",
        f"mesh: {describe(layout)}",
        f"batch: {rows} × {seq} tokens per step, {cfg.train.micro_batches} micro-batches, "
        f"{micro_rows} row(s) × {seq // layout.size('context')} tokens per device per "
        "micro-batch",
        "per device:",
        f"  parameters (FP32 master) {gib(figures['params'])}",
        f"  optimizer state          {gib(figures['opt_state'])}",
        f"  FP8 state                {gib(figures['fp8_state'])}",
        f"  temporaries (XLA)        {gib(figures['temporaries'])}   activations, gradients, "
        "buffers",
        f"  peak                     {gib(figures['peak'])}   arguments + temporaries",
        f"model FLOPs: {flops_token / 1e9:.2f} GFLOP/token, {figures['flops_per_step'] / 1e15:.2f} "
        f"PFLOP/step ({figures['flops_per_step'] / figures['devices'] / 1e12:.1f} TFLOP per "
        "device)",
        f"compiled for {figures['target']} in {figures['compile_seconds']:.0f} s",
    ]
    if "census" in figures:
        lines += _census_lines(figures["census"])
    if "projection" in figures:
        lines += describe_projection(figures["projection"])
    return lines


def _census_lines(c: dict) -> list[str]:
    lines = [
        "GEMM census (optimized HLO; loop bodies once): "
        f"{c['fp8_gemms']} FP8 cuBLASLt ({c['fp8_gemms_f32_out']} with FP32 output), "
        f"{c['bf16_gemms']} BF16, {c['f32_gemms']} FP32-operand, {c['xla_dots']} XLA dots; "
        f"{c['attention_kernels']} cuDNN attention, {c['pallas_kernels']} Pallas/Triton "
        f"kernels ({c['pallas_quantize']} quantizing); "
        f"{c['seq_by_seq_buffers']} [seq, seq] buffer shapes",
    ]
    if c["te_gemms"] or c["te_quantize"]:
        lines.append(
            f"TransformerEngine: {c['te_gemms']} GEMM calls ({c['te_fp8_gemms']} FP8), "
            f"{c['te_quantize']} quantize kernels (counted in the GEMMs above too)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m infir2_jax.plan", __doc__, raw_doc=True)
    add_config(parser)
    add_set(parser)
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
        help="compile for fake CPU devices or compile-only H100/H200 GPUs (with a projected "
        "step time)",
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
