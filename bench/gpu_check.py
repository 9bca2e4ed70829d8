"""The first-GPU check: one command, under 8 minutes on one H100, that measures what matters
most first and loses nothing if a step fails, hangs or crashes.

    python bench/gpu_check.py [--out gpu_check] [--wheels build/gpu_wheels] [--budget 450]
    python bench/gpu_check.py --smoke --out /tmp/gc     # the same script, tiny, on the CPU

Steps, in order of value (each in a process of its own, killed when its share of the time
budget runs out; the parent process never imports JAX):
  1. kernel    the Pallas blockwise FP8 kernel against its exact reference (sampled rows) at
               4096³, Qwen2.5-7B's projection GEMMs (fprop, dgrad, wgrad) and edge tiles; its
               TFLOPS beside cuBLAS BF16 (`jnp.dot`) and cuBLASLt per-tensor FP8 (the GEMM of
               the `current` recipe), GEMM only, operands quantized beforehand.
  2. attention flash attention (cuDNN packed segments, our Pallas kernel) against chunked XLA
               attention on packed 8k rows: forward and forward+backward times, errors.
  3. train     the real train step of `configs/cpt_1p5b.yaml` (one device, 8k × micro-batch 2,
               `--train-layers` to cut depth) for fp8.recipe none / current / blockwise, one
               process each: step time, tokens/s, TFLOPS, MFU, peak device memory, beside the
               planner's figures for the same compiled step (`infir2_jax.plan`: XLA's buffer
               assignment; the planner projects memory, not time).
  4. generate  decode throughput at batch 64 of a random Qwen2.5-1.5B, BF16 vs fp8_block
               (bench/generate.py's engine timing).

Results go to OUT/gpu_check.json and OUT/gpu_check.md, rewritten after every measured row;
each process's whole output to OUT/logs/.
Each row is wrapped on its own (one failing shape does not stop the others) and so is each
step (its traceback recorded, the next step still runs). Timing: warm-up, then the median of a
few runs, each ended by block_until_ready; memory from `device.memory_stats()`.

`--wheels DIR` first installs, with `pip install --no-index --no-deps --target
OUT/site-packages` (put first on the steps' path; the image's environment is not touched),
each wheel of DIR whose distribution is not installed yet (the folder `bench/gpu_wheels.sh`
builds for a GPU image without registry access; default build/gpu_wheels).
`--fault STEP[=raise|exit|hang]` makes STEP fail after its rows (a test of the recording;
`exit` kills its process as a crash would; `hang` blocks before its rows, as a wedged kernel
would, until the parent kills it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("kernel", "quantize", "attention", "train", "generate")
# Shares of the time budget; a step that finishes early leaves its time to the later ones.
SHARES = {"kernel": 0.18, "quantize": 0.04, "attention": 0.13, "train": 0.5, "generate": 0.15}
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "transformers", "torch", "numpy", "grain",
            "array_record")  # fmt: skip
# Dense BF16 tensor-core peak by device name (datasheet, no sparsity): the MFU denominator.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12))
GiB = 2**30


# --------------------------------------------------------------------------- results on disk
class Results:
    """OUT/parts/UNIT.json per unit of work; gpu_check.json + .md merged from all of them."""

    def __init__(self, out: Path):
        self.out = out
        (out / "parts").mkdir(parents=True, exist_ok=True)

    def write_part(self, unit: str, part: dict) -> None:
        _atomic_write(self.out / "parts" / f"{unit}.json", json.dumps(part, indent=1))
        self.render()

    def read_part(self, unit: str) -> dict | None:
        path = self.out / "parts" / f"{unit}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def render(self) -> None:
        header = json.loads((self.out / "parts" / "_run.json").read_text())
        steps = {}
        for unit in header["units"]:
            part = self.read_part(unit) or {"status": "pending", "rows": []}
            step = steps.setdefault(_step_of(unit), {"status": None, "units": {}})
            step["units"][unit] = part
        for step in steps.values():
            step["status"] = _worst(p["status"] for p in step["units"].values())
        doc = {**header, "steps": steps}
        _atomic_write(self.out / "gpu_check.json", json.dumps(doc, indent=1))
        _atomic_write(self.out / "gpu_check.md", "\n".join(markdown(doc)) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_of(unit: str) -> str:
    return unit.split(":")[0]


ORDER = ("failed", "crashed", "timeout", "partial", "running", "pending", "ok")


def _worst(statuses) -> str:
    return min(statuses, key=ORDER.index)


# --------------------------------------------------------------------------- the parent
def units(args) -> list[str]:
    """Units of work, each run in its own process. Each train recipe gets its own process on
    a GPU (peak memory is per process); in --smoke one process runs them all."""
    out = []
    for step in args.steps.split(","):
        if step == "train" and not args.smoke:
            out += [f"train:{r}" for r in args.recipes.split(",")]
        else:
            out.append(step)
    return out


def install_wheels(folder: Path, target: Path) -> list[str]:
    """Installs each wheel of `folder` whose distribution is missing into `target` (a folder
    the check's processes put first on their path: the image's own environment is left as it
    is, whoever manages it); returns the wheels' file names."""
    missing = []
    for wheel in sorted(folder.glob("*.whl")):
        name = wheel.name.split("-")[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    if missing:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
             "--upgrade", "--target", str(target), *map(str, missing)],
            check=True,
        )  # fmt: skip
    return [w.name for w in missing]


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def run_parent(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    for stale in (out / "parts").glob("*.json"):
        stale.unlink()
    began = time.time()
    installed, wheel_error = [], None
    site = out / "site-packages"
    if args.wheels and Path(args.wheels).is_dir():
        try:
            installed = install_wheels(Path(args.wheels), site)
        except Exception:  # noqa: BLE001 — recorded; the steps say what is then missing
            wheel_error = traceback.format_exc()
    if site.is_dir():
        sys.path.insert(0, str(site))  # so that versions() sees them
    todo = units(args)
    header = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "smoke": args.smoke,
        "budget_s": args.budget,
        "versions": versions(),
        "wheels_installed": installed,
        "wheels_error": wheel_error,
        "units": todo,
    }
    _atomic_write(out / "parts" / "_run.json", json.dumps(header))
    results.render()
    env = dict(os.environ)
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if args.smoke:  # the CPU, and XLA's cheapest compile: nothing of it is a GPU figure
        env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    for i, unit in enumerate(todo):
        left = args.budget - (time.time() - began)
        weights = [SHARES[_step_of(u)] / _unit_count(todo, u) for u in todo[i:]]
        timeout = left * weights[0] / sum(weights)
        if timeout < 5:
            results.write_part(unit, {"status": "timeout", "rows": [],
                                      "error": "no time left in the budget"})  # fmt: skip
            continue
        results.write_part(unit, {"status": "running", "rows": [], "budget_s": round(timeout)})
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", unit,
               "--deadline", str(time.time() + timeout - 3)]  # fmt: skip
        print(f"[gpu_check] {unit}: up to {timeout:.0f} s", file=sys.stderr, flush=True)
        start, cpu = time.time(), _children_cpu()
        log = out / "logs" / f"{unit.replace(':', '_')}.log"  # the child's whole output
        log.parent.mkdir(exist_ok=True)
        with log.open("w") as sink:
            try:
                run = subprocess.run(cmd, env=env, timeout=timeout, stdout=sink, stderr=sink)
                rc = run.returncode
            except subprocess.TimeoutExpired:
                rc = None
        tail = log.read_text(errors="replace")[-3000:]
        part = results.read_part(unit) or {"rows": []}
        part["seconds"] = round(time.time() - start, 1)
        part["cpu_seconds"] = round(_children_cpu() - cpu, 1)  # the child's own CPU time
        if rc is None:
            part["status"] = "timeout"
            part["error"] = f"killed after {timeout:.0f} s (its share of --budget)\n{tail}"
        elif part.get("status") in (None, "running"):
            part["status"] = "crashed"
            part["error"] = f"process exited with status {rc} before reporting\n{tail}"
        results.write_part(unit, part)
        print(f"[gpu_check] {unit}: {part['status']} in {part['seconds']} s", file=sys.stderr)
    print(f"[gpu_check] {time.time() - began:.0f} s; wrote {out / 'gpu_check.json'} and "
          f"{out / 'gpu_check.md'}", file=sys.stderr)  # fmt: skip
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _unit_count(todo: list[str], unit: str) -> int:
    return sum(_step_of(u) == _step_of(unit) for u in todo)


# --------------------------------------------------------------------------- a child
class Unit:
    """One unit's rows, written to disk after each; `row()` wraps one measurement."""

    def __init__(self, results: Results, name: str, deadline: float):
        self.results, self.name, self.deadline = results, name, deadline
        self.part = {"status": "running", "rows": [], "notes": []}

    def flush(self) -> None:
        self.results.write_part(self.name, self.part)

    def note(self, text: str) -> None:
        self.part["notes"].append(text)
        self.flush()

    def row(self, item: str, fn, *args, min_left: float = 0.0, **kwargs) -> dict | None:
        """fn(*args, **kwargs) -> dict of figures, recorded as the row `item` (ok, failed
        with its traceback, or skipped when less than `min_left` seconds remain)."""
        if time.time() + min_left > self.deadline:
            self.part["rows"].append({"item": item, "status": "skipped",
                                      "error": "budget spent"})  # fmt: skip
            self.flush()
            return None
        start = time.time()
        try:
            figures = fn(*args, **kwargs)
            row = {"item": item, "status": "ok", **figures}
        except Exception:  # noqa: BLE001 — recorded, the next row runs
            row = {"item": item, "status": "failed", "error": traceback.format_exc()}
        row["seconds"] = round(time.time() - start, 2)
        self.part["rows"].append(row)
        self.flush()
        print(f"[{self.name}] {item}: {row['status']}", file=sys.stderr, flush=True)
        return row


def run_child(args) -> int:
    results = Results(Path(args.out))
    unit = Unit(results, args.child, args.deadline)
    unit.flush()
    try:
        unit.part["environment"] = environment()
        step, _, recipe = args.child.partition(":")
        fault = dict(f.partition("=")[::2] for f in args.fault).get(step)
        if fault == "hang":
            threading.Event().wait()  # never set: only the parent's kill ends this process
        {"kernel": step_kernel, "quantize": step_quantize, "attention": step_attention,
         "train": step_train, "generate": step_generate}[step](
            unit, args, *([recipe] if recipe else []))  # fmt: skip
        if fault == "exit":
            os._exit(7)
        if fault is not None:
            raise RuntimeError(f"injected fault (--fault {step})")
        statuses = {r["status"] for r in unit.part["rows"]}
        unit.part["status"] = "ok" if statuses == {"ok"} else "partial"
        if not unit.part["rows"]:
            unit.part["status"] = "failed"
            unit.part["error"] = "no rows measured"
    except Exception:  # noqa: BLE001 — recorded with its traceback; the parent goes on
        unit.part["status"] = "failed"
        unit.part["error"] = traceback.format_exc()
    unit.flush()
    return 0


def environment() -> dict:
    import jax

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
    }


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def median_seconds(fn, *args, iters: int, warm_up: bool = True) -> float:
    """Median wall time of fn(*args) after one warm-up call (compilation; `warm_up=False` when
    the caller has just run it), each call ended by block_until_ready."""
    import jax

    if warm_up:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16 if name in device_kind), None)


# --------------------------------------------------------------------------- 1. the kernel
def kernel_shapes(args) -> dict[str, tuple[int, int, int, str]]:
    """name -> (M, N, K, b scale mode): bench/fp8_kernel.py's shapes plus edge tiles."""
    if args.smoke:
        # The interpreter simulates every thread of every CTA: one CTA tile, partial in M, N
        # and K (the wrapper pads K to 256), two K steps through the pipeline.
        return {"edge 100×120 (K 200)": (100, 120, 200, "block")}
    from bench.fp8_kernel import shapes

    out = shapes(args.tokens)
    out["edge 8000×3500 (K 3584)"] = (8000, 3500, 3584, "block")
    out["edge 8192×3584 (K 3500)"] = (8192, 3584, 3500, "block")
    out["edge wgrad 3500×3584 (K 8000)"] = (3500, 3584, 8000, "column")
    return out


def step_kernel(unit: Unit, args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.fp8_kernel import operands
    from infir2_jax.fp8.dots import _scaled_f8_dot
    from infir2_jax.fp8.quantize import E4M3, finite_amax, quantize_with_scale, scale_from_amax
    from infir2_jax.kernels import blockwise_fp8_matmul, blockwise_fp8_matmul_reference
    from infir2_jax.kernels.blockwise_fp8 import TuningConfig

    gpu = on_gpu()
    interpret, config = False, None
    if not gpu:  # the Hopper kernel runs in Pallas' GPU interpreter (with the tests' patches)
        sys.path.insert(0, str(ROOT / "tests"))
        import kernel_support

        kernel_support.install_patches()
        interpret = kernel_support.interpret_params()
        config = TuningConfig(max_concurrent_steps=2, num_sms=2)  # fewer simulated CTAs
        unit.note("CPU: the kernel ran in Pallas' GPU interpreter; times are not GPU figures")
    iters = 1 if args.smoke else args.iters
    platform = "cuda" if gpu else "cpu"

    @jax.jit
    def per_tensor(a, b_kmajor):  # the `current` recipe's quantization, outside the timing
        scales = [scale_from_amax(finite_amax(t), E4M3) for t in (a, b_kmajor)]
        return [
            quantize_with_scale(t, s, E4M3) for t, s in zip((a, b_kmajor), scales, strict=True)
        ], scales

    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    fp8_tensor = jax.jit(
        lambda qa, sa, qb, sb: _scaled_f8_dot(qa, sa, qb, sb, (1, 1), jnp.bfloat16, platform)
    )

    def measure(m, n, k, mode, seed):
        fp8_ops, (a_bf16, b_bf16) = operands(m, n, k, mode, jax.random.key(seed))
        kernel = jax.jit(
            lambda *o: blockwise_fp8_matmul(
                *o, b_scale_mode=mode, interpret=interpret, config=config
            )
        )
        got = np.asarray(kernel(*fp8_ops), np.float32)
        # The exact reference on sampled rows (rows are independent): the first and the last
        # 64, so edge tiles are checked; the full FP32 reference would take seconds a shape.
        rows = np.unique(np.r_[0 : min(64, m), max(0, m - 64) : m])
        a_q, a_s, b_q, b_s = fp8_ops
        ref = np.asarray(
            blockwise_fp8_matmul_reference(
                a_q[rows], a_s[rows], b_q, b_s, b_scale_mode=mode, out_dtype=jnp.float32
            )
        )
        error = float(np.abs(got[rows] - ref).max() / max(np.abs(ref).max(), 1e-30))
        flops = 2.0 * m * n * k
        t_kernel = median_seconds(kernel, *fp8_ops, iters=iters, warm_up=False)
        t_bf16 = median_seconds(bf16, a_bf16, b_bf16, iters=iters)
        (qa, qb), (sa, sb) = per_tensor(a_bf16, b_bf16.T)
        t_tensor = median_seconds(fp8_tensor, qa, sa, qb, sb, iters=iters)
        return {
            "shape": f"{m}×{n}×{k}",
            "b_scale": mode,
            "max_rel_error": error,
            "numerics_ok": error <= args.kernel_tolerance,
            "kernel_ms": t_kernel * 1e3,
            "kernel_tflops": flops / t_kernel / 1e12,
            "bf16_tflops": flops / t_bf16 / 1e12,
            "fp8_tensor_tflops": flops / t_tensor / 1e12,
            "kernel_vs_bf16": t_bf16 / t_kernel,
            "kernel_vs_fp8_tensor": t_tensor / t_kernel,
        }

    for i, (name, (m, n, k, mode)) in enumerate(kernel_shapes(args).items()):
        row = unit.row(name, measure, m, n, k, mode, i, min_left=3)
        if row and row["status"] == "ok" and not row["numerics_ok"]:
            row["status"] = "failed"
            row["error"] = f"max relative error {row['max_rel_error']:.2e} > tolerance"
            unit.flush()


# --------------------------------------------------------------------------- quantizers
def step_quantize(unit: Unit, args) -> None:
    """The blockwise recipe's quantizer kernels (kernels/blockwise_quantize.py) against the
    reference the recipe runs elsewhere (`fp8/dots.py: _quantized_both`), on an MLP
    activation: how many output bytes differ (the one-pass quantizer must match bit for bit;
    the SwiGLU kernels' exp and division are checked here for the first time on a GPU), and
    time against XLA running the reference."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from infir2_jax.fp8.dots import (
        Fp8Spec,
        _block_quant_both,
        _swiglu_grads_quant_both,
        _swiglu_quant,
    )
    from infir2_jax.fp8.quantize import E4M3

    gpu = on_gpu()
    if not gpu:
        unit.note("CPU: the kernels ran in Pallas' interpreter; times are not GPU figures")
    shape = (256, 384) if args.smoke else (args.tokens, 8960)  # 1.5B's MLP width
    iters = 1 if args.smoke else args.iters
    kernel_spec = Fp8Spec(E4M3, E4M3, power_of_two=True, kernel="pallas" if gpu else "interpret")
    reference_spec = dataclasses.replace(kernel_spec, kernel="emulated")
    cases = {
        "quantize x (both tilings)": (lambda a, spec: _block_quant_both(a[0], E4M3, spec), 1),
        "SwiGLU h, quantized": (lambda a, spec: _swiglu_quant(a[0], a[1], spec), 2),
        "SwiGLU gradients, quantized": (
            lambda a, spec: sum(_swiglu_grads_quant_both(a[0], a[1], a[2], spec), ()),
            3,
        ),
    }

    def measure(fn, n_inputs, seed):
        keys = jax.random.split(jax.random.key(seed), n_inputs)
        inputs = [jax.random.normal(k, shape, jnp.bfloat16) * 4 for k in keys]
        kernel = jax.jit(lambda *a: fn(a, kernel_spec))
        reference = jax.jit(lambda *a: fn(a, reference_spec))
        got, want = kernel(*inputs), reference(*inputs)
        differing = sum(
            int(np.sum(np.asarray(g).view(np.uint8) != np.asarray(w).view(np.uint8)))
            for g, w in zip(got, want, strict=True)
        )
        total = sum(np.asarray(w).nbytes for w in want)
        t_kernel = median_seconds(kernel, *inputs, iters=iters)
        t_reference = median_seconds(reference, *inputs, iters=iters)
        return {
            "shape": "×".join(map(str, shape)),
            "differing_bytes": float(differing),
            "bits_equal": differing == 0,
            "kernel_ms": t_kernel * 1e3,
            "reference_ms": t_reference * 1e3,
            "kernel_vs_reference": t_reference / t_kernel,
            "bytes_checked": float(total),
        }

    for i, (name, (fn, n_inputs)) in enumerate(cases.items()):
        unit.row(name, measure, fn, n_inputs, i, min_left=2)


# --------------------------------------------------------------------------- 2. attention
def step_attention(unit: Unit, args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.attention_gpu import packed_segments

    gpu = on_gpu()
    if args.smoke:
        shapes, seq, impls, smallest = {"tiny": (2, 1, 32)}, 128, ["chunked", "pallas"], 16
    else:
        shapes = {"1.5B (12/2 heads)": (12, 2, 128), "7B (28/4 heads)": (28, 4, 128)}
        seq, impls, smallest = args.attention_seq, ["chunked", "cudnn", "pallas"], 1024
    if not gpu:
        unit.note("CPU: Pallas ran interpreted, cuDNN not at all; times are not GPU figures")
    iters = 1 if args.smoke else args.iters
    rng = np.random.default_rng(0)
    for name, (heads, kv_heads, d) in shapes.items():
        keys = jax.random.split(jax.random.key(seq), 4)
        case = {
            "segments": packed_segments(1, seq, rng, smallest),
            "q": jax.random.normal(keys[0], (1, seq, heads, d), jnp.bfloat16),
            "k": jax.random.normal(keys[1], (1, seq, kv_heads, d), jnp.bfloat16),
            "v": jax.random.normal(keys[2], (1, seq, kv_heads, d), jnp.bfloat16),
            "cot": jax.random.normal(keys[3], (1, seq, heads, d), jnp.bfloat16),
        }
        for impl in impls:
            if impl == "cudnn" and not gpu:
                continue
            unit.row(f"{name} {impl}", measure_attention, case, impl, gpu, iters, min_left=3)


def measure_attention(case: dict, impl: str, gpu: bool, iters: int) -> dict:
    """Forward and forward+backward of `impl` on one packed row; errors against the case's
    first (chunked XLA) result, kept in `case`."""
    import functools

    import jax
    import jax.numpy as jnp

    from bench.attention_gpu import causal_flops, fwd_bwd
    from infir2_jax.model.attention import attend

    segments, q, k, v = case["segments"], case["q"], case["k"], case["v"]
    seq = q.shape[1]
    index, seg = jnp.arange(seq, dtype=jnp.int32), jnp.asarray(segments)
    run = functools.partial(
        attend, implementation=impl, chunk_size=min(1024, seq),
        max_segments=int(segments.max()) + 1, block=min(128, seq), compiled=gpu,
    )  # fmt: skip
    forward = jax.jit(lambda q, k, v: run(q, k, v, index, index, seg, seg))
    both = jax.jit(functools.partial(fwd_bwd, run, index, seg, case["cot"]))
    value = both(q, k, v)
    t_fwd = median_seconds(forward, q, k, v, iters=iters)
    t_both = median_seconds(both, q, k, v, iters=iters)
    reference = case.setdefault("reference", value)
    errors = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(reference), strict=True)
    ]
    flops = causal_flops(segments, q.shape[2], q.shape[3])  # forward + backward
    return {
        "tokens": seq,
        "documents": int(segments.max()),
        "fwd_ms": t_fwd * 1e3,
        "fwd_bwd_ms": t_both * 1e3,
        "fwd_bwd_tflops": flops / t_both / 1e12,
        "max_err_out": errors[0],
        "max_err_grads": max(errors[1:]),
    }


# --------------------------------------------------------------------------- 3. train step
def train_config(args, recipe: str):
    from infir2_jax.config import load_config

    if args.smoke:
        name, seq, batch = "tiny_cpt", 64, 2
    else:
        name, seq, batch = args.train_config, args.train_seq, args.train_batch
    sets = [f"train.seq_len={seq}", f"train.batch_size={batch}", "train.micro_batches=1",
            "train.init_from=null", "parallel.data=1", "parallel.fsdp=1", "parallel.tensor=1",
            "parallel.context=1", f"fp8.recipe={recipe}"]  # fmt: skip
    layers = 1 if args.smoke else args.train_layers
    if layers:
        sets.append(f"model.num_layers={layers}")
    return load_config(name, sets), name


def step_train(unit: Unit, args, recipe: str | None = None) -> None:
    from infir2_jax.config import load_config

    recipes = [recipe] if recipe else args.recipes.split(",")
    cfg, name = train_config(args, recipes[0])
    full = load_config(name).model.num_layers
    if cfg.model.num_layers != full:
        unit.note(
            f"{name} cut to {cfg.model.num_layers} of its {full} layers: step time, TFLOPS and "
            "memory are not the full model's"
        )
    unit.note(
        "plan peak: XLA's buffer assignment of the same compiled step (arguments + "
        "temporaries), what `python -m infir2_jax.plan` reports; the measured peak adds "
        "allocator slack and cuDNN/cuBLAS workspaces. MFU: model TFLOPS / the device's dense "
        "BF16 peak, for every recipe"
    )
    for r in recipes:
        unit.row(f"fp8.recipe={r}", measure_train, args, r, min_left=5)


def measure_train(args, recipe: str) -> dict:
    import jax
    import numpy as np

    from bench.attention_gpu import packed_segments
    from infir2_jax.plan import _figures
    from infir2_jax.train.setup import initial_state, prepare
    from infir2_jax.train.sharding import global_batch, jit_train_step

    cfg, name = train_config(args, recipe)
    device = jax.devices()[0]
    setup = prepare(cfg, devices=[device])
    rows, seq = cfg.train.batch_size, cfg.train.seq_len
    state = initial_state(cfg, setup.plan, setup.parts, setup.optimizer, setup.state_sharding)
    rng = np.random.default_rng(0)
    segments = packed_segments(rows, seq, rng, max(16, seq // 16))  # 4-16 documents a row
    starts = np.maximum.accumulate(
        np.where(np.diff(segments, prepend=0, axis=1) != 0, np.arange(seq), 0), axis=1
    )
    tokens = rng.integers(0, cfg.model.vocab_size, (rows, seq + 1))
    batch = global_batch(setup.layout, {
        "input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": np.ones((rows, seq)),
        "positions": np.arange(seq)[None, :] - starts, "segment_ids": segments,
    })  # fmt: skip
    step = jit_train_step(
        setup.layout, setup.state_sharding, setup.parts, setup.optimizer, setup.schedule, 1
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    plan = _figures(cfg, setup, compiled, "local", 1, compile_s, setup.plan.attention)
    warmup, timed = (1, 1) if args.smoke else (2, args.train_steps)
    times, losses = [], []
    for i in range(warmup + timed):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
    step_s = statistics.median(times)
    flops = cfg.model.flops_per_token(seq) * rows * seq
    kind = getattr(device, "device_kind", "")
    peak = peak_tflops(kind)
    stats = device.memory_stats() or {}
    measured_peak = stats.get("peak_bytes_in_use")
    return {
        "config": name,
        "layers": cfg.model.num_layers,
        "tokens": f"{rows}×{seq}",
        "attention": setup.plan.describe_attention(),
        "remat": cfg.execution.remat,
        "step_ms": step_s * 1e3,
        "tokens_per_s": rows * seq / step_s,
        "tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None,
        "peak_gib": measured_peak / GiB if measured_peak else None,
        "plan_peak_gib": plan["peak"] / GiB,
        "plan_temporaries_gib": plan["temporaries"] / GiB,
        "plan_params_gib": plan["params"] / GiB,
        "plan_opt_state_gib": plan["opt_state"] / GiB,
        "compile_s": compile_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_finite": bool(np.isfinite(losses).all()),
    }


# --------------------------------------------------------------------------- 4. generation
def step_generate(unit: Unit, args) -> None:
    import dataclasses

    import numpy as np

    from bench.generate import _ours
    from infir2_jax.config import FP8Config
    from infir2_jax.fp8 import make_gemm
    from infir2_jax.model import Qwen2, preset

    if args.smoke:
        name, batch, prompt, new, repeats = "tiny", 2, 4, 4, 1
    else:
        name, batch, prompt, new, repeats = "qwen2.5-1.5b", args.gen_batch, 128, args.gen_new, 2
    from flax import nnx

    cfg = dataclasses.replace(preset(name), dtype="bfloat16", param_dtype="bfloat16")
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, prompt + new))
    params = nnx.to_pure_dict(nnx.state(Qwen2(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    gemms = {"bf16": FP8Config(recipe="none"),
             "fp8_block": FP8Config(recipe="blockwise", power_of_two_scales=False)}  # fmt: skip
    outputs = {}

    def measure(label):
        prefill, total, ids = _ours(
            cfg, params, prompts, new, repeats, make_gemm(gemms[label]), min(64, new)
        )
        outputs[label] = ids
        row = {
            "model": name,
            "batch": batch,
            "prompt": prompt,
            "new_tokens": new,
            "prefill_tokens_per_s": batch * prompt / prefill,
            "decode_tokens_per_s": batch * (new - 1) / max(total - prefill, 1e-9),
            "total_s": total,
        }
        if "bf16" in outputs and label != "bf16":
            same = sum(a == b for a, b in zip(outputs["bf16"], ids, strict=True))
            row["greedy_same_as_bf16"] = f"{same}/{batch}"
        return row

    for label in gemms:
        unit.row(label, measure, label, min_left=5)


# --------------------------------------------------------------------------- markdown
COLUMNS = {
    "kernel": [("shape", "M×N×K", "s"), ("b_scale", "B scales", "s"),
               ("max_rel_error", "max rel. err", ".1e"),
               ("kernel_tflops", "kernel TFLOPS", ".0f"), ("bf16_tflops", "cuBLAS BF16", ".0f"),
               ("fp8_tensor_tflops", "per-tensor FP8", ".0f"),
               ("kernel_vs_bf16", "vs BF16", ".2f"), ("kernel_vs_fp8_tensor", "vs FP8", ".2f")],
    "quantize": [("shape", "shape", "s"), ("differing_bytes", "bytes ≠ reference", ",.0f"),
                 ("bits_equal", "bit-equal", "s"), ("kernel_ms", "kernel ms", ".3f"),
                 ("reference_ms", "XLA reference ms", ".3f"),
                 ("kernel_vs_reference", "speed-up", ".2f")],
    "attention": [("tokens", "tokens", "d"), ("documents", "docs", "d"),
                  ("fwd_ms", "fwd ms", ".2f"), ("fwd_bwd_ms", "fwd+bwd ms", ".2f"),
                  ("fwd_bwd_tflops", "fwd+bwd TFLOPS", ".0f"),
                  ("max_err_out", "err out", ".2g"), ("max_err_grads", "err grads", ".2g")],
    "train": [("layers", "layers", "d"), ("tokens", "tokens", "s"),
              ("attention", "attention", "s"), ("step_ms", "step ms", ".1f"),
              ("tokens_per_s", "tokens/s", ",.0f"), ("tflops", "TFLOPS", ".0f"),
              ("mfu", "MFU", ".1%"), ("peak_gib", "peak GiB", ".2f"),
              ("plan_peak_gib", "plan peak GiB", ".2f"), ("compile_s", "compile s", ".0f"),
              ("loss_last", "loss", ".4f")],
    "generate": [("model", "model", "s"), ("batch", "batch", "d"),
                 ("new_tokens", "new", "d"), ("prefill_tokens_per_s", "prefill tok/s", ",.0f"),
                 ("decode_tokens_per_s", "decode tok/s", ",.0f"), ("total_s", "total s", ".2f"),
                 ("greedy_same_as_bf16", "greedy = BF16", "s")],
}  # fmt: skip


def _cell(value, spec: str) -> str:
    if value is None:
        return "n/a"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def markdown(doc: dict) -> list[str]:
    env = next(
        (p["environment"] for s in doc["steps"].values() for p in s["units"].values()
         if p.get("environment")),
        {},
    )  # fmt: skip
    v = doc["versions"]
    lines = [
        "# GPU check"
        + (" (smoke: tiny shapes on the CPU, not GPU figures)" if doc["smoke"] else ""),
        "",
        f"- started {doc['started']} UTC, `{doc['command']}`, budget {doc['budget_s']:.0f} s",
        f"- device: {env.get('device', '?')} ×{env.get('device_count', '?')} "
        f"({env.get('backend', '?')}), jax {env.get('jax', v.get('jax', '?'))}",
        "- packages: " + ", ".join(f"{k} {x}" for k, x in v.items()),
    ]
    if doc.get("wheels_installed"):
        lines.append("- installed from the wheel folder: " + ", ".join(doc["wheels_installed"]))
    if doc.get("wheels_error"):
        lines += ["- wheel install failed:", "```", doc["wheels_error"].strip(), "```"]
    for step, data in doc["steps"].items():
        lines += ["", f"## {step}: {data['status']}", ""]
        columns = COLUMNS[step]
        lines.append("| item | " + " | ".join(c[1] for c in columns) + " | s |")
        lines.append("|---" * (len(columns) + 2) + "|")
        problems, notes = [], []
        for unit, part in data["units"].items():
            notes += part.get("notes", [])
            for row in part.get("rows", []):
                if row["status"] != "ok":
                    problems.append((f"{unit} / {row['item']}: {row['status']}", row.get("error")))
                    cells = [row["status"]] + [""] * (len(columns) - 1)
                else:
                    cells = [_cell(row.get(key), spec) for key, _, spec in columns]
                lines.append(
                    f"| {row['item']} | " + " | ".join(cells) + f" | {row.get('seconds', '')} |"
                )
            if part["status"] not in ("ok", "partial"):
                problems.append((f"{unit}: {part['status']}", part.get("error")))
        lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)]
        for title, error in problems:
            lines.append(f"- **{title}**")
            if error:
                lines += ["```", "\n".join(error.strip().splitlines()[-25:]), "```"]
    return lines


# --------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json/.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (tests)")
    p.add_argument(
        "--wheels",
        default=str(ROOT / "build" / "gpu_wheels"),
        help="install the missing packages of this wheel folder first",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all steps (default 450; --smoke 600)",
    )
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--iters", type=int, default=10, help="timed runs per kernel/attention row")
    p.add_argument("--tokens", type=int, default=8192, help="kernel: tokens of the 7B GEMMs")
    p.add_argument(
        "--kernel-tolerance",
        type=float,
        default=1e-2,
        help="kernel: max error / max |reference| accepted (BF16 output)",
    )
    p.add_argument("--attention-seq", type=int, default=8192)
    p.add_argument("--train-config", default="cpt_1p5b")
    p.add_argument("--train-seq", type=int, default=8192)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument(
        "--train-layers",
        type=int,
        default=None,
        help="cut the model to this many layers (recorded in the output)",
    )
    p.add_argument("--train-steps", type=int, default=3, help="timed steps after 2 warm-up")
    p.add_argument("--recipes", default="none,current,blockwise")
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--gen-new", type=int, default=256)
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="STEP[=raise|exit]",
        help="make STEP fail after its rows (tests the recording)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 600.0 if args.smoke else 450.0
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"--steps: unknown {sorted(unknown)}; known: {','.join(STEPS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, str(ROOT))
        return run_child(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
