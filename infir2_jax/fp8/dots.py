"""Scaled FP8 matmuls y = x @ w with custom VJPs: fprop, dgrad and wgrad all in FP8.

x: [tokens, in], w: [in, out] (callers flatten leading dims). The three GEMMs:
  fprop  y  = x · w        (contract `in`)
  dgrad  dx = g · wᵀ       (contract `out`)
  wgrad  dw = xᵀ · g       (contract `tokens`)
An operand's scale may vary only along dimensions that are not contracted, so a scaled
product factors as  (q_a · q_b) ⊙ (s_a ⊗ s_b): one FP8 dot with unit scales, then an FP32
rescale. That is what XLA maps to a cuBLASLt FP8 GEMM on Hopper (per-tensor scales fold into
the GEMM's alpha; row/column scales are an epilogue multiply).

Per-tensor (`current`, `delayed`) and `rowwise` really run `dot_general(f8, f8)`; on GPU the
per-tensor ones are written so that both scales fold into the cuBLASLt FP8 GEMM, which writes
BF16 directly (see `_scaled_f8_dot`).
`blockwise` (InfiR2's 1×128 / 128×128) has scales that vary along the contracted dimension,
which no XLA GEMM supports on Hopper: on GPU it runs our Pallas kernel
(infir2_jax/kernels/blockwise_fp8.py), elsewhere an exact emulation (dequantize, FP32 dot per
128-K block) of the same arithmetic. Its operands x and g are quantized the same way: on GPU by
one Pallas kernel writing both tilings (infir2_jax/kernels/blockwise_quantize.py), elsewhere by
the reference quantizer, with the same bits. `blockwise_mlp` runs a whole SwiGLU MLP block
that way, with SwiGLU computed inside the quantizer kernels (its output and input gradients
never exist in BF16).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.layout import Layout, with_layout_constraint

from infir2_jax.fp8.base import FP8_SCALE
from infir2_jax.fp8.quantize import (
    Fp8Format,
    finite_amax,
    pow2_exponents,
    pow2_from_exponents,
    quantize_blocks,
    quantize_with_scale,
    scale_from_amax,
)
from infir2_jax.kernels import blockwise_fp8_matmul, blockwise_fp8_matmul_reference
from infir2_jax.kernels.blockwise_quantize import (
    COL,
    ROW,
    quantize_both,
    swiglu_grads_quantize_both,
    swiglu_quantize,
)
from infir2_jax.kernels.swiglu import swiglu, swiglu_grads


@dataclasses.dataclass(frozen=True)
class Fp8Spec:
    """Static numerics of one recipe (hashable: a `nondiff_argnums` argument)."""

    fwd: Fp8Format  # activations and weights
    bwd: Fp8Format  # output gradients
    margin: int = 0
    power_of_two: bool = False
    block: int = 128  # blockwise: 1×block tiles, block×block weight blocks
    kernel: str = "auto"  # blockwise: auto | pallas | emulated | interpret (see _block_matmul)
    # The platform compiled for ("cpu", "cuda"), bound with the execution plan
    # (`Gemm.for_execution`); None (a dot called on its own): decided when XLA lowers it.
    platform: str | None = None
    # Per-tensor recipes: whether their GEMMs take the pinned TN form (see "per-tensor"
    # below); False where XLA's SPMD partitioner splits them.
    pinned: bool = True


def _f8_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """dot_general of two FP8 operands with FP32 output (unit scales)."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _rescaled_dot(qa, sa, qb, sb, contract, out_dtype):
    """The FP32 product of the FP8 operands, times both scales, in `out_dtype`."""
    return (_f8_dot(qa, qb, contract) * (sa * sb)).astype(out_dtype)


def _dequantized_dot(qa, sa, qb, sb, contract, out_dtype):
    """The same product written as XLA's GEMM rewriter wants it on GPU: each operand
    dequantized (`convert(f8) -> bf16 × scale`), one dot with an `out_dtype` result."""
    # q, k and v quantize the same x identically; without the barrier XLA merges their three
    # dots into one over concatenated weights, which is no longer the FP8 pattern (it would
    # run as a BF16 GEMM on dequantized operands).
    qa, sa, qb, sb = jax.lax.optimization_barrier((qa, sa, qb, sb))
    a = qa.astype(out_dtype) * sa.astype(out_dtype)
    b = qb.astype(out_dtype) * sb.astype(out_dtype)
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)


def _scaled_f8_dot(
    qa, sa, qb, sb, contract: tuple[int, int], out_dtype, platform: str | None = None
) -> jax.Array:
    """(qa · sa) · (qb · sb) for per-tensor (scalar) scales: FP8 operands, FP32 accumulation,
    FP32 scales, an `out_dtype` result — one arithmetic, lowered two ways.

    On GPU, `_dequantized_dot`: XLA folds it into one cuBLASLt FP8 GEMM that takes both FP32
    scales and writes BF16 directly, so no FP32 [M, N] product exists. Elsewhere, and for FP32
    results (cuBLASLt does not write those from scaled FP8 operands), `_rescaled_dot`, which is
    what that GEMM computes: on the CPU the dequantized form would round the scales to BF16.
    """
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return _rescaled_dot(qa, sa, qb, sb, contract, out_dtype)
    branches = {
        name: partial(fn, contract=contract, out_dtype=out_dtype)
        for name, fn in (("cpu", _rescaled_dot), ("default", _dequantized_dot))
    }
    if platform is not None:
        return branches["cpu" if platform == "cpu" else "default"](qa, sa, qb, sb)
    return jax.lax.platform_dependent(qa, sa, qb, sb, **branches)


def _dtype_token(x: jax.Array) -> jax.Array:
    """A zero-size array carrying x's type (dtype, and inside a shard_map the mesh axes it
    varies over) through custom_vjp residuals."""
    return x.reshape(-1)[:0]


def _cotangent_like(ct: jax.Array, token: jax.Array) -> jax.Array:
    """`ct` summed over the mesh axes it varies over and its primal does not (inside a
    shard_map: e.g. wgrad partial sums over data-parallel shards of the tokens)."""
    extra = jax.typeof(ct).manual_axis_type.varying - jax.typeof(token).manual_axis_type.varying
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _sum_cotangents(parts: list[jax.Array], dtype) -> jax.Array:
    """dx of an input shared by several GEMMs: their dgrads (each already in the GEMM's
    output dtype) summed in FP32 and rounded to `dtype` once, not pairwise."""
    if len(parts) == 1:
        return parts[0].astype(dtype)
    return sum(p.astype(jnp.float32) for p in parts).astype(dtype)


def row_major(a: jax.Array) -> jax.Array:
    """`a` pinned to the row-major layout. The kernel reads some operands transposed (8-bit
    wgmma wants both K-major); unpinned, XLA's layout assignment pushes that transpose back
    through elementwise producers into the layer scan's stacked residuals, and then keeps a
    transposed copy of a whole stack (BENCHMARKS.md, "H100 compile census", fix 2).
    Pinned, each transpose happens once per layer, inside the quantizing fusion that writes the
    FP8 copy."""
    return with_layout_constraint(a, Layout(tuple(range(a.ndim))))


# --------------------------------------------------------------------------- per-tensor
# On one device every per-tensor GEMM is written in cuBLASLt's one FP8 layout (TN: both
# operands K-major, contracting their dimension 1), and the copies it reads transposed are
# asked for in JAX, beside the cast, with pinned layouts: XLA then writes both copies in one
# kernel (one read of the input). Left to XLA, the transposes are separate kernels over the
# FP8 copies, inserted by its GEMM rewriter after fusion (BENCHMARKS.md, "Projected step
# time"). A pinned array is one XLA's SPMD partitioner cannot split (it would gather it whole
# onto every device), and unpinned the TN form plans more memory under FSDP than the plain
# one: where XLA partitions the GEMMs (`spec.pinned` False, fp8/recipes.py) they keep the
# plain form and XLA places the transposes.
def _pinned(a: jax.Array, spec: Fp8Spec) -> jax.Array:
    return row_major(a) if spec.pinned else a


def _quantized(a: jax.Array, scale, fmt: Fp8Format, spec: Fp8Spec) -> jax.Array:
    """a in FP8; pinned, its input and output row-major (otherwise layout assignment moves
    the transpose of a copy back into a's producer rather than into this cast)."""
    return _pinned(quantize_with_scale(_pinned(a, spec), scale, fmt), spec)


def _fprop(qx, sx, qw, sw, spec: Fp8Spec, out_dtype) -> jax.Array:
    """y = x · w: x [t, in] with wᵀ [out, in] (pinned), or with w [in, out]."""
    if spec.pinned:
        return _scaled_f8_dot(qx, sx, row_major(qw.T), sw, (1, 1), out_dtype, spec.platform)
    return _scaled_f8_dot(qx, sx, qw, sw, (1, 0), out_dtype, spec.platform)


def _kept_for_wgrad(qx: jax.Array, spec: Fp8Spec) -> jax.Array:
    """What the backward pass keeps of x: xᵀ [in, t] (pinned: written with qx), or qx."""
    return row_major(qx.T) if spec.pinned else qx


def _wgrad(kept_x, sx, qg, sg, spec: Fp8Spec, out_dtype) -> jax.Array:
    """dw = xᵀ · g over tokens: xᵀ [in, t] with gᵀ [out, t] (pinned), or x with g."""
    if spec.pinned:
        qg_t = row_major(qg.T)
        return _scaled_f8_dot(kept_x, sx, qg_t, sg, (1, 1), out_dtype, spec.platform)
    return _scaled_f8_dot(kept_x, sx, qg, sg, (0, 0), out_dtype, spec.platform)


def _per_tensor_scale(a: jax.Array, fmt: Fp8Format, spec: Fp8Spec) -> jax.Array:
    """a's scale from its amax, named FP8_SCALE: the remat policies keep it (a scalar) rather
    than have the recomputed forward pass read a again for its amax."""
    return checkpoint_name(scale_from_amax(finite_amax(a), fmt, margin=spec.margin), FP8_SCALE)


def _per_tensor_fwd(x, w, sx, sw, spec: Fp8Spec):
    """y = x · w, and what the backward pass keeps of x (`_kept_for_wgrad`) and of w."""
    qx = _quantized(x, sx, spec.fwd, spec)
    qw = _quantized(w, sw, spec.fwd, spec)
    return _fprop(qx, sx, qw, sw, spec, x.dtype), (_kept_for_wgrad(qx, spec), qw)


def _per_tensor_bwd(g, kept_x, qw, sx, sw, sg, spec: Fp8Spec, x_dtype, w_dtype):
    """(dx, dw) from g: dx = g · wᵀ contracts `out` (g [t, out], w [in, out]); dw = xᵀ · g."""
    qg = _quantized(g, sg, spec.bwd, spec)
    dx = _scaled_f8_dot(qg, sg, qw, sw, (1, 1), x_dtype, spec.platform)
    return dx, _wgrad(kept_x, sx, qg, sg, spec, w_dtype)


def current_scaling_dot(x: jax.Array, w: jax.Array, spec: Fp8Spec) -> jax.Array:
    """Per-tensor scales from this step's amax of x, w (forward) and g (backward)."""
    return current_scaling_dots(x, (w,), spec)[0]


def current_scaling_dots(x: jax.Array, ws, spec: Fp8Spec) -> tuple:
    """x @ w for each w in `ws`, x quantized once (q, k, v or gate, up share their input):
    one FP8 copy of x is kept for the backward pass instead of one per GEMM. Each product is
    exactly `current_scaling_dot(x, w)`; x's cotangent sums the dgrads in FP32."""
    return _current_scaling_dots(x, tuple(ws), spec)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _current_scaling_dots(x, ws, spec):
    return _current_fwd(x, ws, spec)[0]


def _current_fwd(x, ws, spec):
    sx = _per_tensor_scale(x, spec.fwd, spec)
    qx = _quantized(x, sx, spec.fwd, spec)
    ys, qws, sws = [], [], []
    for w in ws:
        sw = _per_tensor_scale(w, spec.fwd, spec)
        qw = _quantized(w, sw, spec.fwd, spec)
        ys.append(_fprop(qx, sx, qw, sw, spec, x.dtype))
        qws.append(qw)
        sws.append(sw)
    tokens = (_dtype_token(x), tuple(_dtype_token(w) for w in ws))
    return tuple(ys), (_kept_for_wgrad(qx, spec), sx, tuple(qws), tuple(sws), tokens)


def _current_bwd(spec, residuals, gs):
    kept_x, sx, qws, sws, (xt, wts) = residuals
    dxs, dws = [], []
    for g, qw, sw, wt in zip(gs, qws, sws, wts, strict=True):
        sg = _per_tensor_scale(g, spec.bwd, spec)
        dx, dw = _per_tensor_bwd(g, kept_x, qw, sx, sw, sg, spec, xt.dtype, wt.dtype)
        dxs.append(dx)
        dws.append(dw)
    return _sum_cotangents(dxs, xt.dtype), tuple(dws)


_current_scaling_dots.defvjp(_current_fwd, _current_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def delayed_scaling_dot(
    x: jax.Array, w: jax.Array, history: jax.Array, probe: jax.Array, spec: Fp8Spec
) -> jax.Array:
    """Per-tensor scales from an amax history [3, H] (rows: x, w, g; scale = max of row).

    `probe` [3] is a zero input whose cotangent reports this application's amaxes of x, w, g;
    the caller rolls them into the history once per optimizer step (never through the
    optimizer). The history's own cotangent is zero.
    """
    return _delayed_fwd(x, w, history, probe, spec)[0]


def _history_scales(history: jax.Array, spec: Fp8Spec) -> tuple[jax.Array, ...]:
    amax = jnp.max(history, axis=-1)
    fmts = (spec.fwd, spec.fwd, spec.bwd)
    return tuple(scale_from_amax(amax[i], fmts[i], margin=spec.margin) for i in range(3))


def _delayed_fwd(x, w, history, probe, spec):
    sx, sw, sg = (checkpoint_name(s, FP8_SCALE) for s in _history_scales(history, spec))
    y, (kept_x, qw) = _per_tensor_fwd(x, w, sx, sw, spec)
    observed = jnp.stack([finite_amax(x), finite_amax(w)])
    residuals = (kept_x, qw, sx, sw, sg, observed, _dtype_token(x), _dtype_token(w), history, probe)
    return y, residuals


def _delayed_bwd(spec, residuals, g):
    kept_x, qw, sx, sw, sg, observed, xt, wt, history, probe = residuals
    dx, dw = _per_tensor_bwd(g, kept_x, qw, sx, sw, sg, spec, xt.dtype, wt.dtype)
    d_probe = jnp.concatenate([observed, finite_amax(g)[None]]).astype(probe.dtype)
    return dx, dw, jnp.zeros_like(history), d_probe


delayed_scaling_dot.defvjp(_delayed_fwd, _delayed_bwd)


# --------------------------------------------------------------------------- rowwise
def rowwise_dot(x: jax.Array, w: jax.Array, spec: Fp8Spec) -> jax.Array:
    """Scales per token for x and g, per output channel for w (fprop); in dgrad and wgrad
    each operand is scaled along its non-contracted dimension (w per input channel, x and g
    per channel over tokens), so every GEMM stays a unit-scale FP8 dot plus a rescale."""
    return rowwise_dots(x, (w,), spec)[0]


def rowwise_dots(x: jax.Array, ws, spec: Fp8Spec) -> tuple:
    """`rowwise_dot(x, w)` for each w in `ws`, x quantized once (see current_scaling_dots)."""
    return _rowwise_dots(x, tuple(ws), spec)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rowwise_dots(x, ws, spec):
    return _rowwise_fwd(x, ws, spec)[0]


def _rowwise_fwd(x, ws, spec):
    t, k = x.shape
    qx, sx = quantize_blocks(x, (1, k), spec.fwd, margin=spec.margin)  # sx [t, 1]
    # wgrad's x, scaled along its non-contracted dimension (per channel over tokens).
    qx_c, sx_c = quantize_blocks(x, (t, 1), spec.fwd, margin=spec.margin)  # [1, k]
    ys, wres = [], []
    for w in ws:
        n = w.shape[1]
        qw, sw = quantize_blocks(w, (k, 1), spec.fwd, margin=spec.margin)  # sw [1, n]
        ys.append((_f8_dot(qx, qw, (1, 0)) * sx * sw).astype(x.dtype))
        wres.append(quantize_blocks(w, (1, n), spec.fwd, margin=spec.margin))  # dgrad's: [k, 1]
    tokens = (_dtype_token(x), tuple(_dtype_token(w) for w in ws))
    return tuple(ys), (qx_c, sx_c, tuple(wres), tokens)


def _rowwise_bwd(spec, residuals, gs):
    qx_c, sx_c, wres, (xt, wts) = residuals
    dxs, dws = [], []
    for g, (qw_r, sw_r), wt in zip(gs, wres, wts, strict=True):
        t, n = g.shape
        qg_r, sg_r = quantize_blocks(g, (1, n), spec.bwd, margin=spec.margin)  # [t, 1]
        dxs.append(_f8_dot(qg_r, qw_r, (1, 1)) * sg_r * sw_r.T)
        qg_c, sg_c = quantize_blocks(g, (t, 1), spec.bwd, margin=spec.margin)  # [1, n]
        dws.append((_f8_dot(qx_c, qg_c, (0, 0)) * sx_c.T * sg_c).astype(wt.dtype))
    dx = sum(dxs) if len(dxs) > 1 else dxs[0]
    return dx.astype(xt.dtype), tuple(dws)


_rowwise_dots.defvjp(_rowwise_fwd, _rowwise_bwd)


# --------------------------------------------------------------------------- blockwise
def blockwise_dot(x: jax.Array, w: jax.Array, spec: Fp8Spec) -> jax.Array:
    """InfiR2 / TE Float8BlockScaling numerics: x and g in 1×B tiles along the contracted
    dimension, w in B×B blocks (reused transposed for dgrad), and for wgrad x and g in B×1
    tiles along tokens. Each GEMM is a block-scaled FP8 product (`_block_matmul`): the Hopper
    kernel (infir2_jax.kernels) or its exact emulation, per `spec.kernel`. The backward pass
    keeps the quantized operands (FP8 + scales), not higher-precision copies."""
    return blockwise_dots(x, (w,), spec)[0]


def blockwise_dots(x: jax.Array, ws, spec: Fp8Spec, gathered: tuple | None = None) -> tuple:
    """`blockwise_dot(x, w)` for each w in `ws`, x quantized once (see current_scaling_dots).

    Inside a shard_map, `gathered[i]` (a `parallel.partitioned.GatheredWeight`) says that
    ws[i] is an FSDP shard: it is gathered and quantized whole, the backward pass keeps only
    this shard's slice of the FP8 weight and gathers that, and wgrad is reduce-scattered."""
    return _blockwise_dots(x, tuple(ws), spec, None if gathered is None else tuple(gathered))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blockwise_dots(x, ws, spec, gathered):
    return _blockwise_fwd(x, ws, spec, gathered)[0]


def _block_quant(a: jax.Array, block: tuple[int, int], fmt: Fp8Format, spec: Fp8Spec):
    return quantize_blocks(a, block, fmt, power_of_two=spec.power_of_two, margin=spec.margin)


def _quantizer_takes(spec: Fp8Spec) -> bool:
    """Whether the one-pass quantizer kernel takes this block (Triton: a power of two >= 16)."""
    return spec.block >= 16 and spec.block & (spec.block - 1) == 0


def _block_quant_both(a: jax.Array, fmt: Fp8Format, spec: Fp8Spec):
    """a [t, k] in 1×B tiles, (q [t, k], s [t, k/B]), and in B×1 tiles along t, transposed:
    (qᵀ [k, t], sᵀ [k, t/B]), the layout in which wgrad's kernel reads it."""
    return _quantized_both(quantize_both, lambda a: (a,), (a,), fmt, spec)


def _quantized_both(
    kernel_fn, tensors_of, inputs: tuple, fmt: Fp8Format, spec: Fp8Spec, copies=(ROW, COL)
):
    """`_block_quant_both`'s results for each tensor `tensors_of(*inputs)` computes,
    flattened: (q, s) for `ROW`, (qᵀ, sᵀ) for `COL`, in the order of `copies`. The same
    numbers two ways, chosen by `_run_on_target`: one Pallas kernel that reads the inputs once
    and computes the tensors tile by tile (`kernel_fn`, from
    infir2_jax/kernels/blockwise_quantize.py), or the tensors computed by XLA and the
    reference quantizer applied to each, the column copy then transposed in FP8."""
    b = spec.block

    def reference(*inputs):
        out = []
        for a in tensors_of(*inputs):
            for copy in copies:
                if copy == ROW:
                    out += _block_quant(a, (1, b), fmt, spec)
                else:
                    q_t, s_t = _block_quant(a, (b, 1), fmt, spec)
                    out += [q_t.T, s_t.T]  # transposed in FP8 (half the bytes)
        return tuple(out)

    kernel = partial(kernel_fn, fmt=fmt, block=b, power_of_two=spec.power_of_two,
                     margin=spec.margin, interpret=spec.kernel == "interpret")  # fmt: skip
    if copies != (ROW, COL):
        kernel = partial(kernel, copies=copies)
    refusal = (
        f"fp8.blockwise_kernel={spec.kernel}: the quantizer kernel takes blocks that are "
        f"powers of two >= 16 (got {b}); use fp8.blockwise_kernel=emulated"
    )
    return _run_on_target(spec, _quantizer_takes(spec), refusal, kernel, reference, *inputs)


def _run_on_target(spec: Fp8Spec, kernel_takes_it: bool, refusal: str, kernel, reference, *args):
    """kernel(*args) or reference(*args) as `spec.kernel` says: "emulated" the reference (any
    platform); "pallas" / "interpret" the kernel (refused with `refusal` where it does not take
    these operands); "auto" the kernel for a CUDA target (`spec.platform`, or where XLA lowers
    it when unbound) where it takes them, the reference elsewhere."""
    if spec.kernel == "emulated" or (spec.kernel == "auto" and not kernel_takes_it):
        return reference(*args)
    if not kernel_takes_it:
        raise ValueError(refusal)
    if spec.kernel in ("pallas", "interpret"):
        return kernel(*args)
    if spec.platform is not None:
        return (kernel if spec.platform == "cuda" else reference)(*args)
    return jax.lax.platform_dependent(*args, cuda=kernel, default=reference)


def _kernel_runs_it(spec: Fp8Spec, out_dtype) -> bool:
    """Whether the Hopper kernel can compute this recipe's GEMMs: E4M3 operands only (its
    wgmma takes one FP8 type), BF16 or FP32 results, 128-wide scale blocks."""
    return (
        spec.fwd.name == spec.bwd.name == "e4m3"
        and spec.block == 128
        and jnp.dtype(out_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
    )


def _block_matmul(a_q, a_s, b_q_kmajor, b_s, mode: str, out_dtype, spec: Fp8Spec) -> jax.Array:
    """[M, N] from block-scaled FP8 operands in the kernel's layout: A [M, K] with scales per
    row per 128 of K, B K-major [N, K] with scales per 128×128 block ("block") or per column
    per 128 of K ("column"). `spec.kernel`: "emulated" dequantizes and sums the 128-K blocks
    in FP32 (any platform); "pallas" runs the Hopper kernel; "interpret" runs it in Pallas'
    GPU interpreter (CPU tests); "auto" the kernel for a CUDA target (`spec.platform`, or
    where XLA lowers it when unbound), the emulation elsewhere."""
    emulated = partial(blockwise_fp8_matmul_reference, b_scale_mode=mode, out_dtype=out_dtype)
    kernel = partial(
        blockwise_fp8_matmul,
        b_scale_mode=mode,
        out_dtype=out_dtype,
        interpret=spec.kernel == "interpret",
    )
    refusal = (
        f"fp8.blockwise_kernel={spec.kernel}: the kernel takes E4M3 operands, 128 blocks and "
        f"BF16/FP32 results (got formats {spec.fwd.name}/{spec.bwd.name}, block "
        f"{spec.block}, {jnp.dtype(out_dtype)}); use fp8.blockwise_kernel=emulated"
    )
    takes_it = _kernel_runs_it(spec, out_dtype)
    return _run_on_target(spec, takes_it, refusal, kernel, emulated, a_q, a_s, b_q_kmajor, b_s)


def _weight_gemms(qx, sx, ws, gathered, spec: Fp8Spec, out_dtype) -> tuple[tuple, tuple]:
    """fprop of block-quantized x ([t, in] in 1×B tiles) with each w: (ys, what each GEMM's
    backward keeps of w: this device's slice of the FP8 weight and its block scales)."""
    b = spec.block
    ys, wres = [], []
    for w, split in zip(ws, gathered, strict=True):
        whole = row_major(split.gather(w) if split else w)
        qw, sw = _block_quant(whole, (b, b), spec.fwd, spec)  # [in, out], [in/b, out/b]
        ys.append(_block_matmul(qx, sx, qw.T, sw.T, "block", out_dtype, spec))
        wres.append((row_major(split.local(qw) if split else qw), sw))
    return tuple(ys), tuple(wres)


def _keep_scales(s: jax.Array, spec: Fp8Spec) -> jax.Array:
    """Power-of-two scales are kept as their exponents (int16: half the bytes of FP32)."""
    return pow2_exponents(s) if spec.power_of_two else s


def _kept_scales(kept: jax.Array, spec: Fp8Spec) -> jax.Array:
    return pow2_from_exponents(kept) if spec.power_of_two else kept


def _blockwise_fwd(x, ws, spec, gathered):
    gathered = gathered or (None,) * len(ws)
    x = row_major(x)
    # fprop: x in 1×B tiles, qx [t, in], sx [t, in/b]. wgrad contracts tokens: x in B×1
    # tiles along them, in the layout the kernel reads (A = xᵀ): qx_tt [in, t], sx_tt
    # [in, t/b]; kept for the backward pass (1 byte per element, plus one scale per 128).
    qx, sx, qx_tt, sx_tt = _block_quant_both(x, spec.fwd, spec)
    ys, wres = _weight_gemms(qx, sx, ws, gathered, spec, x.dtype)
    tokens = (_dtype_token(x), tuple(_dtype_token(w) for w in ws))
    return ys, (row_major(qx_tt), _keep_scales(sx_tt, spec), wres, tokens)


def _unkept(residuals, spec: Fp8Spec) -> tuple:
    """`_blockwise_fwd`'s residuals as `_input_grads` takes them: ((qx_tt, sx_tt), wres,
    tokens), the scales decoded."""
    qx_tt, sx_kept, wres, tokens = residuals
    return (qx_tt, _kept_scales(sx_kept, spec)), wres, tokens


def _input_grads(quantized_gs, x_t, wres, tokens, spec, gathered) -> tuple[jax.Array, tuple]:
    """(dx, dws) of `_blockwise_fwd`'s GEMMs from their output gradients, each already
    quantized both ways by `_block_quant_both` (qg, sg, qg_tt, sg_tt); x_t = (qx_tt, sx_tt)
    is wgrad's copy of x, wres each GEMM's weight as `_weight_gemms` keeps it."""
    qx_tt, sx_tt = x_t
    xt, wts = tokens
    gathered = gathered or (None,) * len(quantized_gs)
    dxs, dws = [], []
    for (qg, sg, qg_tt, sg_tt), (qw, sw), wt, split in zip(
        quantized_gs, wres, wts, gathered, strict=True
    ):
        qw = split.gather(qw) if split else qw  # the FP8 weight, gathered in FP8
        # dgrad: dx = g · wᵀ; B = wᵀ is [out, in], K-major that is w itself ([in, out]).
        dxs.append(_block_matmul(qg, sg, qw, sw, "block", xt.dtype, spec))
        # wgrad: dw = xᵀ · g over tokens; A = xᵀ [in, t], B = g K-major: gᵀ [out, t], whose
        # 1×B tiles are g's B×1 tiles along tokens.
        dw = _block_matmul(qx_tt, sx_tt, row_major(qg_tt), sg_tt, "column", wt.dtype, spec)
        dws.append(_cotangent_like(split.reduce_scatter(dw) if split else dw, wt))
    return _cotangent_like(_sum_cotangents(dxs, xt.dtype), xt), tuple(dws)


def _blockwise_bwd(spec, gathered, residuals, gs):
    # dgrad's g in 1×B tiles, qg [t, out], sg [t, out/b]; wgrad's in B×1 tiles along
    # tokens, transposed: qg_tt [out, t], sg_tt [out, t/b].
    quantized = [_block_quant_both(row_major(g), spec.bwd, spec) for g in gs]
    return _input_grads(quantized, *_unkept(residuals, spec), spec, gathered)


_blockwise_dots.defvjp(_blockwise_fwd, _blockwise_bwd)


# --------------------------------------------------------------------------- blockwise MLP
def blockwise_mlp(x: jax.Array, ws, spec: Fp8Spec, gathered: tuple | None = None) -> jax.Array:
    """down(swiglu(x @ w_gate, x @ w_up)) for ws = (w_gate, w_up, w_down) in the blockwise
    recipe, equal bit for bit to `blockwise_dots` applied to gate/up, `swiglu`, then down:
    the same GEMMs on the same FP8 operands. What it saves is memory and memory traffic:
    SwiGLU's output h exists only as the down GEMM's FP8 operands (`swiglu_quantize`), and its
    input gradients only as the gate/up GEMMs' (`swiglu_grads_quantize_both`): neither is
    written, read back and quantized in BF16. Nor is h kept for the backward pass: its FP8
    copy for down's wgrad is computed there again from gate and up, which SwiGLU's backward
    keeps anyway (one pass over them instead of keeping [tokens, ffn] FP8 per layer).
    `gathered` as in `blockwise_dots`, one per weight."""
    return _blockwise_mlp(x, tuple(ws), spec, None if gathered is None else tuple(gathered))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blockwise_mlp(x, ws, spec, gathered):
    return _blockwise_mlp_fwd(x, ws, spec, gathered)[0]


def _swiglu_quant(gate, up, spec: Fp8Spec, copies=(ROW, COL)):
    """h = swiglu(gate, up) quantized (`_quantized_both`'s `copies`), h never in memory."""
    return _quantized_both(
        swiglu_quantize, lambda g, u: (swiglu(g, u),), (gate, up), spec.fwd, spec, copies
    )


def _swiglu_grads_quant_both(gate, up, dh, spec: Fp8Spec):
    """SwiGLU's input gradients for dh, each quantized both ways: two (q, s, qᵀ, sᵀ)."""
    out = _quantized_both(swiglu_grads_quantize_both, swiglu_grads, (gate, up, dh), spec.bwd, spec)
    return out[:4], out[4:]


def _blockwise_mlp_fwd(x, ws, spec, gathered):
    gathered = gathered or (None,) * 3
    (gate, up), inner = _blockwise_fwd(x, ws[:2], spec, gathered[:2])
    qh, sh = _swiglu_quant(gate, up, spec, copies=(ROW,))  # fprop's copy only
    (y,), wres = _weight_gemms(qh, sh, ws[2:], gathered[2:], spec, gate.dtype)
    # h's own type (gate's) and down's weight, for the backward pass's residuals.
    tokens = (_dtype_token(gate), (_dtype_token(ws[2]),))
    return y, (inner, gate, up, wres, tokens)


def _blockwise_mlp_bwd(spec, gathered, residuals, g):
    gathered = gathered or (None,) * 3
    inner, gate, up, wres, tokens = residuals
    qh_tt, sh_tt = _swiglu_quant(gate, up, spec, copies=(COL,))  # wgrad's copy of h, again
    quantized_g = _block_quant_both(row_major(g), spec.bwd, spec)
    dh, (dw_down,) = _input_grads(
        [quantized_g], (row_major(qh_tt), sh_tt), wres, tokens, spec, gathered[2:]
    )
    dx, (dw_gate, dw_up) = _input_grads(
        _swiglu_grads_quant_both(gate, up, dh, spec), *_unkept(inner, spec), spec, gathered[:2]
    )
    return dx, (dw_gate, dw_up, dw_down)


_blockwise_mlp.defvjp(_blockwise_mlp_fwd, _blockwise_mlp_bwd)
