"""Projected step time of a compiled step on an H100 / H200: a roofline over XLA's optimized HLO.

    figures = project(compiled.as_text(), "h100", model_flops_per_device=...).as_dict()
    print("\\n".join(describe(figures)))

The planner (`python -m infir2_jax.plan --target h100|h200`) prints it and puts it in `--json`.
It is a projection, not a measurement: it ignores caches, wave quantization, kernel quality and
overlap between streams. Use it to compare variants of one step (FP8 recipe against BF16, before
against after a change) and to find the kernels that move bytes for nothing.

The model, assumption by assumption:
* Every kernel-launching instruction of the optimized module runs a number of times per step:
  the entry once, a `while` body times its trip count (XLA's known_trip_count, else the bound its
  condition compares the counter with), its condition one time more, nested loops multiplying;
  `call` and `async-start` run their computation once, `conditional` its most expensive branch.
  A fusion is one kernel (its body is not walked).
* GEMMs (cuBLAS / cuBLASLt custom calls, the FP8 `__cublas$lt$matmul$f8` included;
  TransformerEngine's GEMM calls; Pallas Mosaic GPU / Triton kernels with two FP8 matrix
  operands; fusions holding a dot) take
  max(FLOPs / (peak of their operand dtype x 0.7), bytes / (HBM bandwidth x 0.8)); FP8 operands
  run at the FP8 peak, BF16 / FP16 at the BF16 peak, FP32 at the TF32 peak.
* cuDNN fused attention and Pallas attention kernels (three or more 4-D operands) take their
  FLOPs, halved for a causal mask, at 0.5 of the BF16 peak (or their bytes, if slower). Forward:
  the two GEMMs QK^T and PV; cuDNN's backward: five (S recomputed, dV, dP, dQ, dK); Pallas's
  dK/dV kernel four and dQ kernel three.
* Every other kernel moves its bytes in + out once at 0.8 of the HBM bandwidth; slices read only
  the slice, in-place dynamic-update-slice / scatter write only the update.
* Quantization kernels are the memory-bound ones with an FP8 output, an amax (a max-reduction
  over |x|, or |x| as integer bit patterns) or an FP8 operand converted up, and
  TransformerEngine's quantize calls; they are reported apart. Where XLA fused such work into
  a kernel the BF16 step runs too (an amax's bit patterns written beside the SwiGLU), only the
  bytes of the FP8 / integer / predicate / small (scale) outputs count as quantization.
* Each kernel launch costs 3 us, reported as its own line.
* Collectives use NVLink ring formulas at 0.8 of the per-direction bandwidth (450 GB/s on
  H100 / H200): all-gather and reduce-scatter move (n-1)/n of the full buffer, all-reduce
  2(n-1)/n, all-to-all (n-1)/n, a collective-permute the buffer once; n is the replica group's
  size. They are not overlapped with compute in the total.
Peak rates per target are `gpu_target.PEAKS` (the datasheets).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

# Fractions of the datasheet peaks that well-shaped kernels reach on Hopper: large cuBLASLt
# GEMMs ~650-750 of 989 TFLOP/s; FlashAttention-3-class kernels ~450-600 TFLOP/s fwd+bwd
# (causal, BF16, head dim 128); streaming kernels ~80 % of HBM; NCCL ~360 of 450 GB/s.
GEMM_EFFICIENCY = 0.7
ATTENTION_EFFICIENCY = 0.5
MEMORY_EFFICIENCY = 0.8
COLLECTIVE_EFFICIENCY = 0.8
LAUNCH_SECONDS = 3e-6

CATEGORIES = {
    "gemm_bf16": "BF16 GEMMs",
    "gemm_fp8": "FP8 GEMMs",
    "gemm_fp32": "FP32 GEMMs (TF32)",
    "attention": "attention",
    "memory": "memory-bound kernels",
    "quantization": "quantization kernels",
    "collective": "collectives",
    "launch": "launch overhead",
}

ELEMENT_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5,
}  # fmt: skip

# Instructions that launch nothing: views, bookkeeping, the completion half of async pairs.
NO_KERNEL = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
    "optimization-barrier", "after-all", "add-dependency", "partition-id", "replica-id",
    "domain", "get-dimension-size", "async-update", "async-done", "all-gather-done",
    "all-reduce-done", "collective-permute-done", "copy-done", "send-done", "recv-done",
    "fusion-done",
}  # fmt: skip
COLLECTIVES = {
    "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
    "collective-permute", "collective-broadcast",
}  # fmt: skip
SLICES = {"dynamic-slice", "slice", "gather"}
IN_PLACE = {"dynamic-update-slice", "scatter"}
VIEWS = {"bitcast", "reshape"}


# ----------------------------------------------------------------------------------- parsing
@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> float:
        return self.numel * ELEMENT_BYTES[self.dtype]

    @property
    def is_fp8(self) -> bool:
        return is_fp8(self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def is_fp8(dtype: str) -> bool:
    """FP8 (and FP4) element types: f8e4m3fn, f8e5m2, ..."""
    return dtype.startswith(("f8", "f4"))


_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def arrays_of(type_text: str) -> list[Array]:
    """The arrays of an HLO type (an array or a tuple), in order; layouts and comments dropped."""
    text = re.sub(r"\{[^{}]*\}", "", re.sub(r"/\*.*?\*/", "", type_text))
    return [
        Array(dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims in _ARRAY.findall(text)
        if dtype in ELEMENT_BYTES
    ]


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    result: list[Array]
    operands: list[str]
    attributes: str  # everything after the operand list
    literal: str  # a constant's value / a parameter's index
    is_root: bool

    @property
    def head(self) -> str:
        """The attributes before backend_config, which may hold arbitrary bytes (Mosaic)."""
        return self.attributes.split("backend_config=", 1)[0]

    def called(self, key: str) -> str | None:
        """The computation named by `key=` (calls, body, condition, to_apply)."""
        match = re.search(rf"\b{key}=%?([\w.\-]+)", self.head)
        return match.group(1) if match else None

    def branches(self) -> list[str]:
        names = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", self.head)
        listed = re.search(r"branch_computations=\{([^}]*)\}", self.head)
        if listed:
            names += [b.strip().lstrip("%") for b in listed.group(1).split(",") if b.strip()]
        return names

    def backend_config(self) -> dict:
        """backend_config as JSON ({} where it is not JSON, as for Mosaic GPU kernels)."""
        start = self.attributes.find("backend_config=")
        if start < 0:
            return {}
        text = self.attributes[start + len("backend_config=") :]
        try:
            if text.startswith('"'):  # older HLO printers quote it
                text, _ = json.JSONDecoder().raw_decode(text)
            value, _ = json.JSONDecoder().raw_decode(text)
        except (json.JSONDecodeError, TypeError):
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def target(self) -> str:
        match = re.search(r'custom_call_target="([^"]*)"', self.head)
        return match.group(1) if match else ""


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}
        self.users: dict[str, list[Instruction]] = {}
        for i in self.instructions:
            for operand in i.operands:
                self.users.setdefault(operand, []).append(i)
        roots = [i for i in self.instructions if i.is_root]
        self.root = roots[0] if roots else self.instructions[-1]


@dataclasses.dataclass
class HloModule:
    computations: dict[str, Computation]
    entry: str
    partitions: int  # devices of the SPMD program: a collective without replica_groups spans them


def _group_end(text: str, start: int) -> int:
    """The index just past the bracketed group that opens at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in: {text[:200]}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]] if text.strip() else parts


_DEFINITION = re.compile(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")


def parse_instruction(line: str) -> Instruction | None:
    """One `[ROOT] %name = TYPE opcode(OPERANDS), ATTRIBUTES` line (None for anything else)."""
    definition = _DEFINITION.match(line)
    if not definition:
        return None
    at = definition.end()
    type_end = _group_end(line, at) if line[at] == "(" else line.find(" ", at)
    opcode = _OPCODE.match(line, type_end)
    if type_end < 0 or not opcode:
        return None
    operands_end = _group_end(line, opcode.end() - 1)
    inside = line[opcode.end() : operands_end - 1]
    # Operands print as `%name` or `TYPE %name`; a constant's parentheses hold its value.
    operands = [
        part.split()[-1].lstrip("%")
        for part in _split_top_level(inside)
        if part.split() and part.split()[-1].startswith("%")
    ]
    return Instruction(
        name=definition.group(2),
        opcode=opcode.group(1),
        result=arrays_of(line[at:type_end]),
        operands=operands,
        attributes=line[operands_end:],
        literal=inside.strip(),
        is_root=bool(definition.group(1)),
    )


_HEADER = re.compile(r"(ENTRY\s+)?%?([\w.\-]+)\s*[({]")


def parse_module(text: str) -> HloModule:
    """An optimized HLO module's text (`compiled.as_text()`)."""
    computations: dict[str, Computation] = {}
    entry, partitions = None, 1
    name, instructions = None, []
    for line in text.splitlines():
        if line.startswith("HloModule"):
            found = re.search(r"num_partitions=(\d+)", line)
            partitions = int(found.group(1)) if found else 1
        elif name is None:
            header = _HEADER.match(line)
            if header and line.rstrip().endswith("{") and not line[:1].isspace():
                name, instructions = header.group(2), []
                entry = name if header.group(1) else entry
        elif line.strip() == "}":
            computations[name] = Computation(name, instructions)
            name = None
        elif (instruction := parse_instruction(line)) is not None:
            instructions.append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return HloModule(computations, entry, partitions)


# ------------------------------------------------------------------------------ the kernels
@dataclasses.dataclass
class Kernel:
    """One kernel-launching instruction: what one execution costs, and how often it runs."""

    name: str
    computation: str
    category: str  # a key of CATEGORIES
    seconds: float  # one execution, without the launch
    flops: float = 0.0
    bytes: float = 0.0
    detail: str = ""
    count: float = 0.0  # executions per step
    quantization_seconds: float = 0.0  # the part of `seconds` that is FP8's work

    @property
    def own_seconds(self) -> float:
        """`seconds` less its FP8 work, which the breakdown counts under quantization."""
        return self.seconds - self.quantization_seconds

    def as_dict(self) -> dict:
        return dict(
            name=self.name, computation=self.computation, category=self.category,
            count=self.count, us_each=self.seconds * 1e6,
            ms_per_step=self.seconds * self.count * 1e3, flops=self.flops, bytes=self.bytes,
            quantization_us_each=self.quantization_seconds * 1e6, detail=self.detail,
        )  # fmt: skip


def gemm_shape(lhs: Array, rhs: Array, numbers: dict) -> tuple[int, int, int, int]:
    """(batch, M, N, K) of a dot from its operands and dimension numbers (lists of indices
    under `lhs_contracting_dimensions`, `rhs_batch_dimensions`, ...)."""

    def dims(key: str) -> set[int]:
        return {int(d) for d in numbers.get(key, [])}

    lhs_k, rhs_k = dims("lhs_contracting_dimensions"), dims("rhs_contracting_dimensions")
    lhs_b, rhs_b = dims("lhs_batch_dimensions"), dims("rhs_batch_dimensions")
    batch = math.prod(lhs.dims[d] for d in lhs_b)
    k = math.prod(lhs.dims[d] for d in lhs_k)
    m = math.prod(s for d, s in enumerate(lhs.dims) if d not in lhs_k | lhs_b)
    n = math.prod(s for d, s in enumerate(rhs.dims) if d not in rhs_k | rhs_b)
    return batch, m, n, k


def _mnk(batch: int, m: int, n: int, k: int) -> str:
    return f"{f'B{batch} ' if batch > 1 else ''}M{m} N{n} K{k}"


def dot_numbers(dot: Instruction) -> dict:
    """An HLO dot's `lhs_contracting_dims={1}` ... as gemm_shape's dimension numbers."""
    out = {}
    for side in ("lhs", "rhs"):
        for kind in ("contracting", "batch"):
            found = re.search(rf"{side}_{kind}_dims=\{{([0-9,]*)\}}", dot.head)
            out[f"{side}_{kind}_dimensions"] = found.group(1).split(",") if found else []
    return {k: [d for d in v if d] for k, v in out.items()}


def group_size(instruction: Instruction, default: int) -> int:
    """Devices in each replica group: `{{0,1},{2,3}}`, iota `[groups,size]<=[...]`, a mesh's
    axes `mesh['axis_0'=4,'axis_1'=2] {'axis_1'}` (the named axes' sizes multiplied), or
    all."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", instruction.head)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", instruction.head)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", mesh.group(2)))
    listed = re.search(r"replica_groups=\{\{([^}]*)\}", instruction.head)
    if listed:
        return len([d for d in listed.group(1).split(",") if d.strip()])
    return default


class Roofline:
    """The kernels of one HLO module, timed against one GPU's peaks."""

    def __init__(self, module: HloModule, peaks, launch_seconds: float = LAUNCH_SECONDS):
        self.module = module
        self.peaks = peaks
        self.launch_seconds = launch_seconds
        self.kernels: dict[tuple[str, str], Kernel] = {}
        self._costs: dict[str, float] = {}

    # ---------------------------------------------------------------- execution counts
    def runs(self, computation: str, times: float = 1.0, loops: list | None = None):
        """(kernel, executions) for each kernel launched when `computation` runs `times` times;
        the while loops met are appended to `loops`."""
        comp = self.module.computations[computation]
        for i in comp.instructions:
            if i.opcode == "while":
                trips, how = self.trip_count(i)
                if loops is not None:
                    loops.append(dict(name=i.name, trips=trips, times=times, how=how))
                yield from self.runs(i.called("body"), times * trips, loops)
                yield from self.runs(i.called("condition"), times * (trips + 1), loops)
            elif i.opcode == "conditional":
                yield from self.runs(max(i.branches(), key=self.cost), times, loops)
            elif i.opcode in ("call", "async-start"):
                yield from self.runs(i.called("to_apply") or i.called("calls"), times, loops)
            elif (kernel := self.kernel(comp, i)) is not None:
                yield kernel, times

    def cost(self, computation: str) -> float:
        """Seconds of one execution of a computation (to pick a conditional's branch)."""
        if computation not in self._costs:
            self._costs[computation] = sum(
                times * (kernel.seconds + self.launch_seconds)
                for kernel, times in self.runs(computation)
            )
        return self._costs[computation]

    def trip_count(self, loop: Instruction) -> tuple[int, str]:
        """(trips, how it is known) of a while loop."""
        config = loop.backend_config()
        if "known_trip_count" in config:
            return int(config["known_trip_count"]["n"]), "known_trip_count"
        # The condition compares the counter with a constant bound (possibly inside a fusion).
        bounds, direction = [], "LT"
        pending, seen = [loop.called("condition")], set()
        while pending:
            comp = self.module.computations.get(pending.pop())
            if comp is None or comp.name in seen:
                continue
            seen.add(comp.name)
            for i in comp.instructions:
                if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.literal):
                    bounds.append(int(i.literal))
                elif i.opcode == "compare":
                    found = re.search(r"direction=(\w+)", i.head)
                    direction = found.group(1) if found else direction
                elif i.opcode == "fusion":
                    pending.append(i.called("calls"))
        if not bounds:
            return 1, "unknown: counted once"
        start = int(config.get("known_init_step", {}).get("init", 0))
        trips = max(bounds) - start + (direction in ("LE", "GE"))
        return max(trips, 1), f"condition {direction} {max(bounds)}"

    # ---------------------------------------------------------------- classification
    def kernel(self, comp: Computation, i: Instruction) -> Kernel | None:
        """The kernel `i` launches (None for views and bookkeeping), cached."""
        key = (comp.name, i.name)
        if key not in self.kernels:
            if i.opcode in NO_KERNEL:
                return None
            self.kernels[key] = self._classify(comp, i)
            self.kernels[key].computation = comp.name
        return self.kernels[key]

    def _classify(self, comp: Computation, i: Instruction) -> Kernel:
        operands = [comp.by_name[o].result if o in comp.by_name else [] for o in i.operands]
        collective = i.opcode.removesuffix("-start")
        if collective in COLLECTIVES:
            return self._collective(i, collective, operands)
        if (inner := self._fused_collective(i)) is not None:
            return inner
        if i.opcode == "custom-call":
            return self._custom_call(i, operands)
        if i.opcode == "fusion":
            return self._fusion(i, operands)
        if i.opcode == "dot":
            return self._gemm(i, comp, [i], _nbytes(operands) + _nbytes([i.result]))
        if i.opcode in SLICES:
            moved = 2 * _nbytes([i.result])
        elif i.opcode in IN_PLACE:
            moved = 2 * _nbytes(operands[-1:] if i.opcode == "scatter" else operands[1:2])
        else:
            moved = _nbytes(operands) + _nbytes([i.result])
        share = _fp8_share(self.module, comp, [i], i.result, moved)
        return self._memory(i, moved, share, detail=" ".join(map(str, i.result[:2])))

    def _memory(self, i: Instruction, moved: float, fp8_share: float, detail: str) -> Kernel:
        """A memory-bound kernel, `fp8_share` of whose bytes are FP8's work (1: all of it)."""
        seconds = moved / (self.peaks.hbm_bytes * MEMORY_EFFICIENCY)
        category = "quantization" if fp8_share >= 1 else "memory"
        kernel = Kernel(i.name, "", category, seconds, bytes=moved, detail=detail)
        kernel.quantization_seconds = seconds * min(fp8_share, 1.0)
        return kernel

    def _gemm(self, i: Instruction, comp: Computation, dots: list, moved: float) -> Kernel:
        """A kernel computing `dots` (HLO dots whose operands are in `comp`)."""
        flops, shapes, dtypes = 0.0, [], set()
        for dot in dots:
            lhs, rhs = (comp.by_name[o].result[0] for o in dot.operands[:2])
            batch, m, n, k = gemm_shape(lhs, rhs, dot_numbers(dot))
            flops += 2.0 * batch * m * n * k
            shapes.append(_mnk(batch, m, n, k))
            dtypes |= {lhs.dtype, rhs.dtype}
        detail = f"{', '.join(shapes)} {'x'.join(sorted(dtypes))}"
        return self._timed_gemm(i, flops, moved, sorted(dtypes), detail)

    def _timed_gemm(self, i, flops: float, moved: float, dtypes: list[str], detail: str):
        if any(is_fp8(d) for d in dtypes):
            category, peak = "gemm_fp8", self.peaks.fp8_flops
        elif all(d in ("bf16", "f16") for d in dtypes):
            category, peak = "gemm_bf16", self.peaks.bf16_flops
        else:
            category, peak = "gemm_fp32", self.peaks.tf32_flops
        compute = flops / (peak * GEMM_EFFICIENCY)
        memory = moved / (self.peaks.hbm_bytes * MEMORY_EFFICIENCY)
        bound = "compute" if compute >= memory else "memory"
        return Kernel(
            i.name, "", category, max(compute, memory), flops, moved, f"{detail} {bound}-bound"
        )

    def _custom_call(self, i: Instruction, operands) -> Kernel:
        target = i.target
        moved = _nbytes(operands) + _nbytes([i.result])
        if target.startswith("__cublas"):
            # Result: (product, workspace); the workspace is scratch, not traffic.
            lhs, rhs, product = operands[0][0], operands[1][0], i.result[0]
            config = i.backend_config().get("gemm_backend_config", {})
            batch, m, n, k = gemm_shape(lhs, rhs, config.get("dot_dimension_numbers", {}))
            moved = _nbytes(operands) + product.nbytes
            detail = f"{_mnk(batch, m, n, k)} {lhs.dtype}x{rhs.dtype}"
            return self._timed_gemm(
                i, 2.0 * batch * m * n * k, moved, [lhs.dtype, rhs.dtype], f"{detail} ({target})"
            )
        if target.startswith("te_gemm"):
            # TransformerEngine: (A, A scale_inv, B, B scale_inv, ...), A [M, K] and B [K, N]
            # in some layout: K is what A and B have that the product has not.
            a, b, product = operands[0][0], operands[2][0], i.result[0]
            k = round(math.sqrt(a.numel * b.numel / product.numel))
            detail = f"out {product} K{k} {a.dtype}x{b.dtype} ({target})"
            flops = 2.0 * product.numel * k
            return self._timed_gemm(i, flops, moved, [a.dtype, b.dtype], detail)
        if target.startswith("__cudnn$fmha"):
            return self._cudnn_attention(i, operands, moved)
        if any(name in target for name in ("mosaic", "triton", "pallas")):
            return self._pallas(i, operands, moved)
        te_quantize = target.startswith("te_") and "quantize" in target
        return self._memory(i, moved, float(te_quantize or _writes_fp8(i.result)), target)

    def _cudnn_attention(self, i: Instruction, operands, moved: float) -> Kernel:
        config = i.backend_config().get("cudnn_fmha_backend_config", {})
        # The scores' shape [B, H, Tq, Tk]; Q [B, Tq, H, D] if XLA did not print it.
        scores = config.get("intermediate_tensor_shape", {}).get("dimensions")
        q = operands[0][0]
        if scores and len(scores) == 4:
            b, h, tq, tk = (int(d) for d in scores)
        else:
            b, tq, h, tk = q.dims[0], q.dims[1], q.dims[2], operands[1][0].dims[1]
        d = q.numel // (b * h * tq)
        gemms = 5 if "Backward" in i.target else 2
        causal = "CAUSAL" in str(config.get("mask_type", ""))
        flops = 2.0 * gemms * b * h * tq * tk * d * (0.5 if causal else 1.0)
        detail = f"B{b} H{h} Tq{tq} Tk{tk} D{d} {'causal' if causal else 'full'} ({i.target})"
        return self._attention(i, flops, moved, detail)

    def _attention(self, i: Instruction, flops: float, moved: float, detail: str) -> Kernel:
        compute = flops / (self.peaks.bf16_flops * ATTENTION_EFFICIENCY)
        memory = moved / (self.peaks.hbm_bytes * MEMORY_EFFICIENCY)
        return Kernel(i.name, "", "attention", max(compute, memory), flops, moved, detail)

    def _pallas(self, i: Instruction, operands, moved: float) -> Kernel:
        """Our Pallas kernels: the blockwise FP8 GEMM (A [M, K] and B [N, K] in FP8) and flash
        attention (Q, K, V [B, T, H, D]; causal; kernels named *forward, *dkdv, *dq)."""
        matrices = [o[0] for o in operands if o and o[0].is_fp8 and len(o[0].dims) == 2]
        if len(matrices) >= 2 and i.result:
            out = i.result[0]
            m, n, k = out.dims[-2], out.dims[-1], matrices[0].dims[-1]
            detail = f"M{m} N{n} K{k} {matrices[0].dtype}x{matrices[1].dtype} ({i.target})"
            dtypes = [matrices[0].dtype, matrices[1].dtype]
            return self._timed_gemm(i, 2.0 * m * n * k, moved, dtypes, detail)
        qkv = [o[0] for o in operands if o and len(o[0].dims) == 4]
        if len(qkv) >= 3:
            (b, tq, h, d), tk = qkv[0].dims, qkv[1].dims[1]
            gemms = 4 if "dkdv" in i.head else 3 if "_dq" in i.head else 2
            flops = 2.0 * gemms * b * h * tq * tk * d * 0.5
            detail = f"B{b} H{h} Tq{tq} Tk{tk} D{d} causal, {gemms} GEMMs ({i.target})"
            return self._attention(i, flops, moved, detail)
        return self._memory(i, moved, float(_writes_fp8(i.result)), i.target)

    def _fusion(self, i: Instruction, operands) -> Kernel:
        body = self.module.computations[i.called("calls")]
        dots = [x for x in body.instructions if x.opcode == "dot"]
        if dots:
            return self._gemm(i, body, dots, _nbytes(operands) + _nbytes([i.result]))
        for inner in body.instructions:  # a library call wrapped in a fusion (dynamic slices)
            if inner.opcode == "custom-call":
                inner_operands = [body.by_name[o].result for o in inner.operands]
                kernel = self._custom_call(inner, inner_operands)
                kernel.name = i.name
                return kernel
        moved = sum(_parameter_reads(body, p) for p in body.instructions if p.opcode == "parameter")
        moved += _root_writes(body)
        share = _fp8_share(self.module, body, body.instructions, i.result, moved)
        return self._memory(i, moved, share, " ".join(map(str, i.result[:2])))

    def _fused_collective(self, i: Instruction) -> Kernel | None:
        """A fusion holding a collective (recent XLA runs small all-reduces as Triton
        collective fusions, `fusion-start` / `fusion-done` of kind `__triton_collective`):
        timed as that collective, under the fusion's name."""
        if i.opcode not in ("fusion", "fusion-start"):
            return None
        body = self.module.computations.get(i.called("calls") or "")
        if body is None:
            return None
        for inner in body.instructions:
            kind = inner.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                operands = [body.by_name[o].result for o in inner.operands if o in body.by_name]
                kernel = self._collective(inner, kind, operands)
                return dataclasses.replace(kernel, name=i.name)
        return None

    def _collective(self, i: Instruction, kind: str, operands) -> Kernel:
        n = group_size(i, self.module.partitions)
        data = _nbytes(operands)
        if kind == "all-gather":
            data, factor = data * n, (n - 1) / n
        elif kind == "all-reduce":
            factor = 2 * (n - 1) / n
        elif kind == "collective-permute":
            factor = 1.0
        else:  # reduce-scatter, all-to-all: each device keeps 1/n
            factor = (n - 1) / n
        seconds = factor * data / (self.peaks.nvlink_bytes * COLLECTIVE_EFFICIENCY) if n > 1 else 0
        detail = f"{kind} of {data / 2**20:.1f} MiB over {n} devices"
        return Kernel(i.name, "", "collective", seconds, bytes=data, detail=detail)


def _nbytes(arrays: list[list[Array]]) -> float:
    return sum(a.nbytes for group in arrays for a in group)


def _views_of(body: Computation, name: str) -> list[Instruction]:
    """The users of `name`, looking through bitcasts and reshapes."""
    out = []
    for user in body.users.get(name, []):
        out += _views_of(body, user.name) if user.opcode in VIEWS else [user]
    return out


def _source(body: Computation, name: str) -> str:
    """`name` with bitcasts and reshapes looked through."""
    while name in body.by_name and body.by_name[name].opcode in VIEWS:
        name = body.by_name[name].operands[0]
    return name


def _parameter_reads(body: Computation, parameter: Instruction) -> float:
    """Bytes a fusion reads of one parameter: the slices it takes, nothing of a buffer it
    updates in place, else all of it."""
    read = 0.0
    for user in _views_of(body, parameter.name):
        sliced = user.opcode in SLICES or user.opcode in IN_PLACE
        if not (sliced and _source(body, user.operands[0]) == parameter.name):
            return parameter.result[0].nbytes if parameter.result else 0.0
        read += user.result[0].nbytes if user.opcode in SLICES else 0.0
    return read


def _root_writes(body: Computation) -> float:
    """Bytes a fusion writes: its outputs, only the update of an in-place one."""
    root = body.root
    outputs = [body.by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    written = 0.0
    for out in outputs:
        source = body.by_name[_source(body, out.name)]
        if source.opcode in IN_PLACE:
            update = source.operands[-1] if source.opcode == "scatter" else source.operands[1]
            written += _nbytes([body.by_name[update].result])
        else:
            written += _nbytes([out.result])
    return written


def _writes_fp8(result: list[Array]) -> bool:
    return any(a.is_fp8 for a in result)


def _fp8_share(module: HloModule, comp: Computation, ops: list, result: list[Array], moved):
    """How much of a memory-bound kernel (the instructions `ops`, looked up in `comp`, writing
    `result`, moving `moved` bytes) is FP8's work. A kernel quantizes if it writes FP8, converts
    FP8 up, or takes an amax: a max-reduction over |x|, or |x| as integer bit patterns (as
    `fp8.quantize.finite_amax` computes it). It is all FP8's if it converts FP8 up or writes
    only FP8's arrays: FP8, integer and predicate ones (values, bit patterns, masks) and small
    floating-point ones (scales, partial amaxes: under 1/64 of its largest output). A kernel
    that also writes a large floating-point result, which the BF16 step computes too (XLA fused
    an amax into the SwiGLU, say), is FP8's by the bytes of FP8's outputs."""
    has_abs = any(x.opcode == "abs" for x in ops)
    quantizes, upcasts = _writes_fp8(result), False
    for x in ops:
        inputs = [comp.by_name[o] for o in x.operands if o in comp.by_name]
        if x.opcode == "convert" and any(_writes_fp8(y.result) for y in inputs):
            upcasts = True
        elif x.opcode in ("bitcast", "bitcast-convert") and x.result and inputs:
            quantizes |= inputs[0].opcode == "abs" and x.result[0].dtype[0] in "su"
        elif x.opcode == "reduce" and inputs and inputs[0].result:
            combiner = module.computations.get(x.called("to_apply") or "")
            is_max = combiner is not None and combiner.root.opcode == "maximum"
            quantizes |= is_max and (has_abs or inputs[0].result[0].dtype[0] in "su")
    if upcasts:
        return 1.0
    if not quantizes:
        return 0.0
    largest = max(a.numel for a in result)
    fp8_written = sum(
        a.nbytes for a in result if a.is_fp8 or a.dtype[0] in "sup" or 64 * a.numel < largest
    )
    written = sum(a.nbytes for a in result)
    return 1.0 if fp8_written >= written else fp8_written / moved if moved else 0.0


# ------------------------------------------------------------------------------- projection
@dataclasses.dataclass
class Projection:
    """The roofline of one step: the kernels with their counts, and what they add up to."""

    target: str
    peaks: object  # gpu_target.GpuPeaks
    kernels: list[Kernel]  # those that run (count > 0)
    loops: list[dict]
    launch_seconds: float
    model_flops_per_device: float | None = None

    @property
    def launches(self) -> float:
        return sum(k.count for k in self.kernels)

    @property
    def breakdown(self) -> dict[str, float]:
        """Seconds per step by category (CATEGORIES' order), launches on their own line."""
        out = dict.fromkeys(CATEGORIES, 0.0)
        for k in self.kernels:
            out[k.category] += k.own_seconds * k.count
            out["quantization"] += k.quantization_seconds * k.count
        out["launch"] = self.launches * self.launch_seconds
        return out

    @property
    def seconds(self) -> float:
        return sum(self.breakdown.values())

    def flops(self, *categories: str) -> float:
        return sum(k.flops * k.count for k in self.kernels if k.category in categories)

    def top(self, n: int) -> list[Kernel]:
        return sorted(self.kernels, key=lambda k: -k.seconds * k.count)[:n]

    @property
    def model_tflops_per_gpu(self) -> float | None:
        if self.model_flops_per_device is None:
            return None
        return self.model_flops_per_device / self.seconds / 1e12

    @property
    def mfu(self) -> float | None:
        """Model FLOPs per second over the BF16 peak (the convention for mixed precision)."""
        if self.model_flops_per_device is None:
            return None
        return self.model_flops_per_device / self.seconds / self.peaks.bf16_flops

    def as_dict(self, top: int = 10) -> dict:
        return dict(
            target=self.target,
            total_ms=self.seconds * 1e3,
            breakdown_ms={k: v * 1e3 for k, v in self.breakdown.items()},
            kernel_launches=self.launches,
            gemm_flops=self.flops("gemm_bf16", "gemm_fp8", "gemm_fp32"),
            attention_flops=self.flops("attention"),
            model_tflops_per_gpu=self.model_tflops_per_gpu,
            mfu=self.mfu,
            top_kernels=[k.as_dict() for k in self.top(top)],
            loops=self.loops,
            assumptions=dict(
                peaks=dataclasses.asdict(self.peaks),
                gemm_efficiency=GEMM_EFFICIENCY,
                attention_efficiency=ATTENTION_EFFICIENCY,
                memory_efficiency=MEMORY_EFFICIENCY,
                collective_efficiency=COLLECTIVE_EFFICIENCY,
                launch_us=self.launch_seconds * 1e6,
                collectives_overlapped=False,
            ),
        )


def describe(projection: dict, top: int = 5) -> list[str]:
    """The planner's lines for a projection (`Projection.as_dict()`, as in its `--json`)."""
    total = projection["total_ms"]
    lines = [
        f"projected step time on {projection['target']}: {total:.1f} ms (roofline of the "
        f"optimized HLO, {projection['kernel_launches']:.0f} kernel launches; a projection, not "
        "a measurement)"
    ]
    if projection["mfu"] is not None:
        peak = projection["assumptions"]["peaks"]["bf16_flops"]
        lines.append(
            f"  {projection['model_tflops_per_gpu']:.0f} model TFLOPS/GPU, MFU "
            f"{projection['mfu'] * 100:.1f} % of {peak / 1e12:.0f} TFLOP/s BF16"
        )
    parts = [
        f"{CATEGORIES[c]} {ms:.2f} ms ({ms / total * 100:.0f} %)"
        for c, ms in projection["breakdown_ms"].items()
        if ms > 0
    ]
    lines += ["  " + ", ".join(parts), "  top kernels (ms/step = count × µs each):"]
    for k in projection["top_kernels"][:top]:
        shared = 0 < k["quantization_us_each"] < k["us_each"]
        lines.append(
            f"    {k['ms_per_step']:8.3f} ms {k['count']:6.0f} × {k['us_each']:8.1f} µs  "
            f"{CATEGORIES[k['category']]:<20} {k['name']}: {k['detail']}"
            + (f" ({k['quantization_us_each']:.1f} µs of it FP8's)" if shared else "")
        )
    return lines


def project(
    hlo_text: str,
    target: str,
    *,
    model_flops_per_device: float | None = None,
    launch_seconds: float = LAUNCH_SECONDS,
) -> Projection:
    """The roofline projection of one execution of the module in `hlo_text` on `target`."""
    from infir2_jax.gpu_target import PEAKS

    module = parse_module(hlo_text)
    roofline, loops = Roofline(module, PEAKS[target], launch_seconds), []
    for kernel, times in roofline.runs(module.entry, loops=loops):
        kernel.count += times
    kernels = [k for k in roofline.kernels.values() if k.count > 0]
    return Projection(target, PEAKS[target], kernels, loops, launch_seconds, model_flops_per_device)
