"""Compiling for a GPU on a machine without one, and reading what XLA emitted.

`gpu_devices("h100", 8)` returns compile-only devices of an H100 node, described by XLA's own
target file (gpu_targets/); a mesh of them compiles the real sharded step with XLA:GPU's full
pipeline (GEMM rewriting to cuBLASLt, fusion, buffer assignment) while JAX runs on the CPU.
Needs the CUDA plugin of the pinned jax (`pip install -r requirements-gpu-compile.txt`).

Limits: nothing is autotuned (there is no device to time candidates on), so Triton GEMM
fusions are switched off (`--xla_gpu_enable_triton_gemm=false`, set by the planner before JAX
starts) and every GEMM goes to cuBLAS(Lt), which is what the census counts; cuDNN and cuBLAS
workspaces are not sized, so memory is XLA's buffer assignment, without allocator slack.

`census(hlo_text)` counts, in an optimized HLO module, the GEMM and kernel calls by kind.
Loop bodies (the scan over layers, micro-batches) appear once in the text, so counts are per
body, not per step.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from infir2_jax.compat import cuda_plugin

TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
TARGET_DIR = Path(__file__).resolve().parent / "gpu_targets"
GPUS_PER_HOST = 8
# Fields of newer XLA target files that jaxlib 0.10.2's GpuTargetConfigProto rejects.
UNKNOWN_FIELDS = ("collective_memory_granularity",)
# No Triton GEMMs: there is no device to autotune them on (every GEMM goes to cuBLAS(Lt)).
COMPILE_FLAGS = "--xla_gpu_enable_triton_gemm=false"


@dataclasses.dataclass(frozen=True)
class GpuPeaks:
    """Datasheet rates of one GPU of a target, dense (the "with sparsity" figures halved): what
    the planner's projected step time (infir2_jax/roofline.py) divides work by."""

    bf16_flops: float  # tensor-core FLOP/s on BF16 / FP16 operands
    fp8_flops: float  # ... on FP8 operands
    tf32_flops: float  # ... on FP32 operands (XLA's default precision on Hopper runs TF32)
    hbm_bytes: float  # HBM bytes/s
    nvlink_bytes: float  # NVLink bytes/s per GPU, one direction


# NVIDIA H100 / H200 datasheets, SXM columns: BF16 1,979 / FP8 3,958 / TF32 989 TFLOP/s with
# sparsity; HBM3 3.35 TB/s (H100), HBM3e 4.8 TB/s (H200); NVLink 900 GB/s both directions. The
# target files carry the same HBM figures (memory_bandwidth; checked by the tests).
PEAKS = {
    "h100": GpuPeaks(989.5e12, 1979e12, 494.5e12, 3.35e12, 450e9),
    "h200": GpuPeaks(989.5e12, 1979e12, 494.5e12, 4.8e12, 450e9),
}


class GpuTargetError(RuntimeError):
    """The deviceless GPU compile cannot run here (plugin missing, unknown target)."""


def target_config(name: str) -> str:
    """The GpuTargetConfigProto text of a known target, minus fields jaxlib rejects."""
    if name not in TARGETS:
        raise GpuTargetError(f"--target {name}: known GPU targets are {sorted(TARGETS)}")
    text = (TARGET_DIR / TARGETS[name]).read_text()
    lines = [ln for ln in text.splitlines() if ln.strip().split(":")[0] not in UNKNOWN_FIELDS]
    # Without runtime_version XLA silently drops the FP8 GEMM rewrite (FP8 dots get upcast).
    if not any(ln.strip().startswith("runtime_version:") for ln in lines):
        raise GpuTargetError(f"{TARGETS[name]}: gpu_device_info.runtime_version is missing")
    return "\n".join(lines)


def target_capability(name: str) -> tuple[int, int]:
    """The CUDA compute capability (major, minor) a target file describes."""
    text = target_config(name)
    block = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text)
    if block is None:
        raise GpuTargetError(f"{TARGETS[name]}: no cuda_compute_capability")
    fields = dict(re.findall(r"(major|minor):\s*(\d+)", block.group(1)))
    return int(fields.get("major", 0)), int(fields.get("minor", 0))


def gpu_devices(name: str, count: int) -> list:
    """`count` compile-only devices of target `name`, 8 per host (as on an HGX node)."""
    if cuda_plugin() is None:
        raise GpuTargetError(
            f"--target {name} compiles with XLA:GPU and needs the CUDA plugin of the pinned "
            "jax: pip install -r requirements-gpu-compile.txt (Python 3.11) or "
            "requirements-jax012-test.txt (Python 3.12-3.13)"
        )
    from jax.experimental import topologies

    per_host = min(count, GPUS_PER_HOST)
    if count % per_host:
        raise GpuTargetError(f"--devices {count}: not a whole number of {per_host}-GPU hosts")
    topology = f"1x{count // per_host}x{per_host}"
    desc = topologies.get_topology_desc(
        platform="cuda", topology=topology, target_config=target_config(name)
    )
    return list(desc.devices)


@dataclasses.dataclass
class Census:
    """Calls in an optimized XLA:GPU module (each computation counted once)."""

    fp8_gemms: int = 0  # cuBLASLt FP8 GEMMs
    fp8_gemms_f32_out: int = 0  # ... of which write an FP32 result (rescaled afterwards)
    bf16_gemms: int = 0  # cuBLAS(Lt) GEMMs on BF16/F16 operands
    f32_gemms: int = 0  # cuBLAS(Lt) GEMMs with an FP32 operand (no tensor-core fast path)
    xla_dots: int = 0  # dots XLA left unrewritten (inside fusions)
    attention_kernels: int = 0  # cuDNN fused attention calls
    pallas_kernels: int = 0  # Pallas Mosaic GPU / Triton kernels
    pallas_quantize: int = 0  # ... of which quantize: FP8 results, no FP8 operand
    all_gemms: int = 0
    te_gemms: int = 0  # TransformerEngine GEMM calls (cuBLASLt inside TE; in all_gemms too)
    te_fp8_gemms: int = 0  # ... on FP8 operands (in fp8_gemms too)
    te_quantize: int = 0  # TransformerEngine quantize kernels (cast, amax, transpose)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# Tuple types of more than five elements carry "/*index=5*/" comments.
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(?[\w\[\]{},:\s/*=]*?\)?)\s+([\w\-]+)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OPERANDS = re.compile(r"custom-call\(([^)]*)\)")
_ELEMENT = re.compile(r"\b(f8e4m3fn|f8e5m2|bf16|f16|f32|f64|s8|s32|u8|pred)\[")


def _element_types(type_text: str) -> list[str]:
    return _ELEMENT.findall(type_text)


def census(hlo_text: str) -> Census:
    types: dict[str, str] = {}
    calls: list[tuple[str, str, list[str]]] = []
    for line in hlo_text.splitlines():
        match = _DEF.match(line)
        if not match:
            continue
        name, result_type, opcode = match.groups()
        types[name] = result_type
        if opcode == "custom-call" and (target := _TARGET.search(line)):
            operands = _OPERANDS.search(line)
            # Operands print as "%name" or "type %name": keep the name.
            names = (
                [o.split()[-1].lstrip("%") for o in operands.group(1).split(", ")]
                if operands
                else []
            )
            calls.append((target.group(1), result_type, names))
        elif opcode == "dot":
            calls.append(("dot", result_type, []))
    out = Census()
    for target, result_type, operands in calls:
        if target == "dot":
            out.xla_dots += 1
        elif target.startswith("__cublas"):
            out.all_gemms += 1
            # The first two operands are the matrices (the rest: scales, bias, workspace).
            operand_types = [t for o in operands[:2] for t in _element_types(types.get(o, ""))]
            if target.endswith("$f8") or any(t.startswith("f8") for t in operand_types):
                out.fp8_gemms += 1
                out.fp8_gemms_f32_out += _element_types(result_type)[:1] == ["f32"]
            elif "f32" in operand_types:
                out.f32_gemms += 1
            else:
                out.bf16_gemms += 1
        elif target.startswith("te_gemm"):
            # TE's GEMM: operands (lhs, lhs scale_inv, rhs, rhs scale_inv, ...).
            operand_types = [t for o in operands[0:3:2] for t in _element_types(types.get(o, ""))]
            fp8 = any(t.startswith("f8") for t in operand_types)
            out.all_gemms += 1
            out.te_gemms += 1
            out.te_fp8_gemms += fp8
            if fp8:
                out.fp8_gemms += 1
            else:
                out.bf16_gemms += 1
        elif target.startswith("te_") and "quantize" in target:
            out.te_quantize += 1
        elif target.startswith("__cudnn$fmha"):
            out.attention_kernels += 1
        elif "mosaic" in target or "triton" in target:
            out.pallas_kernels += 1
            operand_types = [t for o in operands for t in _element_types(types.get(o, ""))]
            writes_fp8 = any(t.startswith("f8") for t in _element_types(result_type))
            reads_fp8 = any(t.startswith("f8") for t in operand_types)
            out.pallas_quantize += writes_fp8 and not reads_fp8
    return out


def square_buffers(hlo_text: str, n: int) -> int:
    """Distinct array shapes in an optimized HLO module with two dimensions of size `n`:
    with n the per-device sequence length, the [.., seq, seq] scores, masks, biases and index
    comparisons that flash attention exists to avoid."""
    shapes = set(re.findall(r"\b[a-z]+\d*[a-z0-9]*\[([\d,]+)\]", hlo_text))
    return sum(1 for dims in shapes if [int(d) for d in dims.split(",")].count(n) >= 2)
