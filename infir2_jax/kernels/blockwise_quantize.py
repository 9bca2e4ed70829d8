"""InfiR2's two blockwise quantizations of one tensor in one pass (Pallas, Triton on GPU).

The blockwise recipe (infir2_jax/fp8/dots.py) quantizes x (and the output gradient g) twice:
in 1×b tiles along its columns for fprop/dgrad, and in b×1 tiles along its rows (tokens) for
wgrad, whose kernel reads that copy transposed. With the reference quantizer that is two
amax passes, two casts and a transpose, each reading x from HBM. Here one program per
[b, b] tile of x [M, K] reads the tile once and writes the two copies (`ROW`, `COL`):

  q_row   [M, K]           FP8, x / s_row clamped      = quantize_blocks(x, (1, b)).q
  s_row   [M, ceil(K/b)]   one scale per row per tile  = quantize_blocks(x, (1, b)).scales
  q_col_t [K, M]           FP8, the column copy, stored transposed (the wgrad kernel's layout)
  s_col_t [K, ceil(M/b)]   one scale per column per tile, transposed

or only one of them, where the other is not needed (`swiglu_quantize`'s `copies`).

Every result equals the reference (infir2_jax/fp8/quantize.py) bit for bit, scales included:
the same finite amax (NaN/±inf ignored, 0 if nothing is finite), `scale_from_amax`'s
arithmetic, a true division x / s, a clamp that keeps NaN (Triton's max/min drop NaN, so
the clamp is written with selects) and a round-to-nearest-even cast. (A NaN input stays NaN
of its sign; in E5M2, which has three NaN encodings per sign, which one the cast writes is
the platform's choice: XLA:CPU writes 0x7E, Pallas' interpreter 0x7F; Hopper's cvt its
canonical NaN, not checked on a GPU.)

Division: Pallas' Triton lowering emits `arith.divf` for f32 `/`, which Triton lowers to
PTX `div.full.f32`, an approximation (up to 2 ulp). The reference divides with IEEE
rounding (XLA:GPU emits `div.rn.f32`), so on GPU the kernel divides with inline PTX
`div.rn.f32` (tests/test_blockwise_quantize.py reads the PTX). Power-of-two scales skip the
division: x · (1/s) is exact for them. Pallas' interpreter (CPU tests) evaluates the same
kernel with XLA's own division.

Edge tiles (M or K not a multiple of b, or smaller than b) are loaded masked with zeros,
which cannot raise an amax, and stored masked. Scales that would be subnormal (amax below
fmt_max · 2^-126) are outside the bit-identity contract: XLA flushes them differently per
platform.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from infir2_jax.kernels.swiglu import swiglu_grads, swiglu_value

if TYPE_CHECKING:  # infir2_jax.fp8 imports this module (its recipes call the kernel)
    from infir2_jax.fp8.quantize import Fp8Format

# The two copies of a quantized tensor: 1×b tiles along its columns (fprop, dgrad), and b×1
# tiles along its rows, stored transposed (wgrad).
ROW, COL = "row", "col"

_EXPONENT_BITS = 0x7F800000  # an f32's exponent field
_MANTISSA_BITS = 0x007FFFFF
_EXPONENT_ONE = 0x00800000  # + 1 on the exponent field: twice the value


def _ieee_div(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """a / b with IEEE round-to-nearest, as XLA divides (see the module docstring)."""
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
    if interpret:
        # As in `scale_from_amax`: XLA rewrites a division by a broadcast (or a constant) as
        # a multiply by its reciprocal; the barrier, after the broadcast, keeps it a division.
        return a / lax.optimization_barrier(b)
    [out] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )
    return out


def _divide(interpret: bool):
    return functools.partial(_ieee_div, interpret=interpret)


def _round_up_pow2(s: jax.Array) -> jax.Array:
    """`quantize.round_up_pow2` for normal positive f32 s, on the bits: s itself if its
    mantissa is 0, else the next exponent with mantissa 0 (inf past the largest)."""
    bits = lax.bitcast_convert_type(s, jnp.int32)
    up = (bits & _EXPONENT_BITS) + _EXPONENT_ONE
    return lax.bitcast_convert_type(jnp.where((bits & _MANTISSA_BITS) == 0, bits, up), jnp.float32)


def _scales(amax, *, fmt: Fp8Format, power_of_two: bool, margin: int, interpret: bool):
    """`quantize.scale_from_amax`: amax / fmt_max · 2^margin, 1 where amax is 0."""
    s = _ieee_div(amax, jnp.full_like(amax, fmt.max), interpret) * (2.0**margin)
    s = jnp.where(amax > 0, s, 1.0)
    return _round_up_pow2(s) if power_of_two else s


def _quantize(x, s, fmt: Fp8Format, power_of_two: bool, interpret: bool):
    """clamp(x / s, ±fmt_max) in FP8; NaN stays NaN (comparisons with NaN are false)."""
    if power_of_two:  # 1/s is exact, so x · (1/s) = x / s; one division per row or column
        y = x * _ieee_div(jnp.ones_like(s), s, interpret)
    else:
        y = _ieee_div(x, s, interpret)
    y = jnp.where(y > fmt.max, fmt.max, jnp.where(y < -fmt.max, -fmt.max, y))
    return y.astype(fmt.dtype)


def _kernel(
    *refs, n_in: int, prologue, copies: tuple[str, ...], fmt: Fp8Format, block: int,
    power_of_two: bool, margin: int, interpret: bool,
):  # fmt: skip
    """Loads the [b, b] tile (i, j) of each of the `n_in` inputs, computes the tensors to
    quantize from them (`prologue`; the identity for `quantize_both`) and writes each one's
    results: q_row, s_row for `ROW`, q_col_t, s_col_t for `COL`, in the order of `copies`."""
    in_refs, out_refs = refs[:n_in], refs[n_in:]
    m, k = in_refs[0].shape
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * block + jnp.arange(block)
    cols = j * block + jnp.arange(block)
    row_ok, col_ok = rows < m, cols < k
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tile = (pl.ds(i * block, block), pl.ds(j * block, block))
    # Padding is loaded as 0, which the prologues map to 0: it cannot raise an amax.
    loaded = [plgpu.load(r.at[tile], mask=tile_ok, other=0) for r in in_refs]
    scales = functools.partial(
        _scales, fmt=fmt, power_of_two=power_of_two, margin=margin, interpret=interpret
    )
    outputs = iter(out_refs)
    for x in prologue(*loaded):
        x = x.astype(jnp.float32)
        # |x| where finite (NaN and ±inf compare false), else 0.
        finite_abs = jnp.where(jnp.abs(x) < jnp.inf, jnp.abs(x), 0.0)
        for copy in copies:
            q_ref, s_ref = next(outputs), next(outputs)
            if copy == ROW:
                s_row = scales(jnp.max(finite_abs, axis=1))  # [b]: one per row
                q_row = _quantize(x, s_row[:, None], fmt, power_of_two, interpret)
                plgpu.store(q_ref.at[tile], q_row, mask=tile_ok)
                plgpu.store(s_ref.at[pl.ds(i * block, block), j], s_row, mask=row_ok)
            else:
                s_col = scales(jnp.max(finite_abs, axis=0))  # [b]: one per column
                q_col = _quantize(x, s_col[None, :], fmt, power_of_two, interpret)
                plgpu.store(q_ref.at[tile[::-1]], q_col.T, mask=tile_ok.T)
                plgpu.store(s_ref.at[pl.ds(j * block, block), i], s_col, mask=col_ok)


def _quantize_call(
    name: str, inputs: tuple[jax.Array, ...], prologue, n_out: int, fmt: Fp8Format, *,
    block: int, power_of_two: bool, margin: int, interpret: bool, num_warps: int,
    copies: tuple[str, ...] = (ROW, COL),
) -> tuple[jax.Array, ...]:  # fmt: skip
    """The kernel over [b, b] tiles of the 2-D inputs (one shape): per tensor, (q, s) for
    each of `copies`."""
    if not copies or len(set(copies)) != len(copies) or not set(copies) <= {ROW, COL}:
        raise ValueError(f"{name}: copies {copies} must name {ROW!r} and/or {COL!r}, once each")
    x = inputs[0]
    if x.ndim != 2 or any(a.shape != x.shape for a in inputs):
        shapes = [a.shape for a in inputs]
        raise ValueError(f"{name} expects 2-D tensors of one shape, got {shapes}")
    if block < 16 or block & (block - 1):
        # Triton's tensors have power-of-two shapes; its layouts want at least 16.
        raise ValueError(f"{name}: block {block} must be a power of two >= 16")
    m, k = x.shape
    tiles_m, tiles_k = pl.cdiv(m, block), pl.cdiv(k, block)
    kernel = functools.partial(
        _kernel, n_in=len(inputs), prologue=prologue, copies=copies, fmt=fmt, block=block,
        power_of_two=power_of_two, margin=margin, interpret=interpret,
    )  # fmt: skip
    # Inside a shard_map the results vary over the mesh axes x varies over.
    like_x = functools.partial(
        jax.ShapeDtypeStruct, manual_axis_type=jax.typeof(x).manual_axis_type
    )
    shapes = {
        ROW: [like_x((m, k), fmt.dtype), like_x((m, tiles_k), jnp.float32)],
        COL: [like_x((k, m), fmt.dtype), like_x((k, tiles_m), jnp.float32)],
    }
    one = [shape for copy in copies for shape in shapes[copy]]
    return tuple(
        pl.pallas_call(
            kernel,
            grid=(tiles_m, tiles_k),
            out_shape=one * n_out,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
            name=name,
        )(*inputs)
    )


def quantize_both(
    x: jax.Array,
    fmt: Fp8Format,
    *,
    block: int = 128,
    power_of_two: bool = False,
    margin: int = 0,
    interpret: bool = False,
    num_warps: int = 8,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(q_row [M, K], s_row [M, ceil(K/b)], q_col_t [K, M], s_col_t [K, ceil(M/b)]) of a
    2-D x: `quantize_blocks(x, (1, b))` and the transposes of `quantize_blocks(x, (b, 1))`,
    bit for bit, in one kernel (see the module docstring)."""
    return _quantize_call(
        "blockwise_quantize_both", (x,), lambda x: (x,), 1, fmt, block=block,
        power_of_two=power_of_two, margin=margin, interpret=interpret, num_warps=num_warps,
    )  # fmt: skip


def swiglu_quantize(
    gate: jax.Array, up: jax.Array, fmt: Fp8Format, *, copies: tuple[str, ...] = (ROW, COL),
    block: int = 128, power_of_two: bool = False, margin: int = 0, interpret: bool = False,
    num_warps: int = 8,
) -> tuple[jax.Array, ...]:  # fmt: skip
    """`quantize_both(swiglu(gate, up))`'s results for `copies` (both: all four) without
    h = silu(gate) · up in memory: each program computes its tile of h
    (`infir2_jax.kernels.swiglu`, rounded to gate's dtype as the model rounds it) from the
    gate and up tiles and quantizes it. The MLP needs h only in FP8 (the down projection's
    operands), so h is never written in BF16; it asks for the `ROW` copy in the forward pass
    and for the `COL` copy, again from gate and up, in the backward pass."""
    return _quantize_call(
        "blockwise_swiglu_quantize", (gate, up),
        lambda g, u: (swiglu_value(g, u, _divide(interpret)),), 1, fmt, block=block,
        power_of_two=power_of_two, margin=margin, interpret=interpret, num_warps=num_warps,
        copies=copies,
    )  # fmt: skip


def swiglu_grads_quantize_both(
    gate: jax.Array, up: jax.Array, dh: jax.Array, fmt: Fp8Format, *, block: int = 128,
    power_of_two: bool = False, margin: int = 0, interpret: bool = False, num_warps: int = 8,
) -> tuple[jax.Array, ...]:  # fmt: skip
    """`quantize_both` of SwiGLU's two input gradients (d gate, then d up; 8 results) for the
    cotangent dh of h, in one pass over gate, up and dh: the gate and up projections' backward
    GEMMs need their output gradients only in FP8, so neither is written in BF16."""
    return _quantize_call(
        "blockwise_swiglu_grads_quantize_both", (gate, up, dh),
        lambda g, u, d: swiglu_grads(g, u, d, _divide(interpret)), 2, fmt,
        block=block, power_of_two=power_of_two, margin=margin, interpret=interpret,
        num_warps=num_warps,
    )  # fmt: skip
