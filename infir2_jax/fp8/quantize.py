"""FP8 formats and the one quantizer every recipe uses: scales per rectangular block.

A block of shape (bm, bk) over a 2-D tensor [M, K] covers every granularity we need:
(M, K) is per-tensor, (1, K) per-row (token), (M, 1) per-column (channel), (1, 128) InfiR2's
activation/gradient tiles, (128, 128) its weight blocks. Partial edge blocks are allowed.

Conventions (as in TransformerEngine and DeepSeek-V3's `weight_scale_inv`): the scale `s` is
the dequantization multiplier, `x ≈ q * s`, computed as `s = amax / fmt_max` (× 2^margin),
optionally rounded up to a power of two. `amax` ignores NaN/inf, so non-finite inputs never
poison a scale or an amax history; an amax of 0 gives scale 1. Values are clamped to
±fmt_max before the cast (a plain cast of 500 to E4M3 gives NaN); NaN stays NaN and ±inf
saturates to ±fmt_max, so a non-finite input still shows up as a non-finite loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: jnp.dtype
    max: float


E4M3 = Fp8Format("e4m3", jnp.dtype(jnp.float8_e4m3fn), 448.0)
E5M2 = Fp8Format("e5m2", jnp.dtype(jnp.float8_e5m2), 57344.0)
FORMATS = {f.name: f for f in (E4M3, E5M2)}


def finite_amax(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """max |x| over finite entries, in FP32 (NaN and ±inf are ignored; 0 if none is finite).

    Computed on the bit patterns, in x's own width: a non-negative float's bits order like
    the float itself, and the non-finite ones are those >= the bits of +inf, so masking is an
    integer multiply. Two layouts this avoids: `max(where(isfinite, |x|, 0))` inside a layer
    scan, whose zeros operand is loop-invariant and gets hoisted out of the loop by JAX's scan
    partial evaluation as a materialized FP32 array the size of x (BENCHMARKS.md, "H100
    compile census", fix 1); and an FP32 copy of a transposed BF16 input (twice the bytes)."""
    bits, dtype = _finite_abs_bits(x)
    return _float_of(jnp.max(bits, axis=axis, keepdims=keepdims), dtype)


def _finite_abs_bits(x: jax.Array) -> tuple[jax.Array, jnp.dtype]:
    """|x|'s bit patterns as same-width integers, 0 where x is not finite, and the float
    dtype they encode."""
    dtype = jnp.dtype(x.dtype)
    if dtype not in _INT_OF:
        x, dtype = x.astype(jnp.float32), jnp.dtype(jnp.float32)
    int_dtype, inf_bits = _INT_OF[dtype]
    bits = jax.lax.bitcast_convert_type(jnp.abs(x), int_dtype)
    return bits * (bits < inf_bits).astype(int_dtype), dtype


def _float_of(bits: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The FP32 value of `_finite_abs_bits` patterns (or a reduction of them)."""
    return jax.lax.bitcast_convert_type(bits, dtype).astype(jnp.float32)


# float dtype -> (same-width signed integer dtype, bit pattern of +inf)
_INT_OF = {
    jnp.dtype(jnp.float32): (jnp.dtype(jnp.int32), 0x7F800000),
    jnp.dtype(jnp.bfloat16): (jnp.dtype(jnp.int16), 0x7F80),
    jnp.dtype(jnp.float16): (jnp.dtype(jnp.int16), 0x7C00),
}


def round_up_pow2(s: jax.Array) -> jax.Array:
    """2^ceil(log2 s) for s > 0, exactly (via the float's exponent, no log rounding)."""
    mantissa, exponent = jnp.frexp(s)  # s = mantissa * 2^exponent, mantissa in [0.5, 1)
    return jnp.ldexp(jnp.ones_like(s), jnp.where(mantissa == 0.5, exponent - 1, exponent))


def pow2_exponents(s: jax.Array) -> jax.Array:
    """log2 of power-of-two scales as int16 (exact for every normal FP32 power of two; XLA
    flushes subnormal scales to zero anyway): half the bytes of the FP32 scales, for keeping
    them until the backward pass."""
    return (jnp.frexp(s)[1] - 1).astype(jnp.int16)


def pow2_from_exponents(e: jax.Array) -> jax.Array:
    """The FP32 scales `pow2_exponents` encoded, exactly."""
    return jnp.ldexp(jnp.ones(e.shape, jnp.float32), e.astype(jnp.int32))


def scale_from_amax(
    amax: jax.Array, fmt: Fp8Format, *, power_of_two: bool = False, margin: int = 0
) -> jax.Array:
    """Dequantization scale amax / fmt_max · 2^margin (1 where amax is 0)."""
    amax = amax.astype(jnp.float32)
    # A true division: XLA rewrites `a / broadcast(c)` as `a * (1/c)`, 1 ulp off amax/fmt_max
    # for most amaxes; the barrier keeps the divisor opaque (cheap: one value per block).
    fmt_max = jax.lax.optimization_barrier(jnp.full(amax.shape, fmt.max, jnp.float32))
    s = amax / fmt_max * (2.0**margin)
    s = jnp.where(amax > 0, s, 1.0)
    return round_up_pow2(s) if power_of_two else s


def quantize_with_scale(x: jax.Array, scale: jax.Array, fmt: Fp8Format) -> jax.Array:
    """q = clamp(x / scale, ±fmt_max) cast to FP8; `scale` broadcasts against x."""
    y = x.astype(jnp.float32) / scale
    return jnp.clip(y, -fmt.max, fmt.max).astype(fmt.dtype)


def _effective(x: jax.Array, block: tuple[int, int]) -> tuple[int, int]:
    """The block shape on x: a block dimension larger than x's is x's."""
    return min(block[0], x.shape[0]), min(block[1], x.shape[1])


def _padded(x: jax.Array, block: tuple[int, int]) -> tuple[jax.Array, tuple[int, int]]:
    """[M, K] zero-padded to multiples of the effective block, and that block."""
    (m, k), (bm, bk) = x.shape, _effective(x, block)
    pm, pk = -m % bm, -k % bk
    return (jnp.pad(x, ((0, pm), (0, pk))) if pm or pk else x), (bm, bk)


def expand_scales(scales: jax.Array, block: tuple[int, int], shape: tuple[int, int]) -> jax.Array:
    """Per-block scales [ceil(M/bm), ceil(K/bk)] repeated to the element grid [M, K]."""
    full = jnp.repeat(jnp.repeat(scales, block[0], axis=0), block[1], axis=1)
    return full[: shape[0], : shape[1]]


def block_scales(
    x: jax.Array,
    block: tuple[int, int],
    fmt: Fp8Format,
    *,
    power_of_two: bool = False,
    margin: int = 0,
) -> tuple[jax.Array, tuple[int, int]]:
    """Scales [ceil(M/bm), ceil(K/bk)] of a 2-D tensor and the effective block shape."""
    scales = scale_from_amax(_block_amax(x, block), fmt, power_of_two=power_of_two, margin=margin)
    return scales, _effective(x, block)


def _block_amax(x: jax.Array, block: tuple[int, int]) -> jax.Array:
    """finite_amax per (bm, bk) block of a 2-D tensor (zero-padded to block multiples):
    [ceil(M/bm), ceil(K/bk)]. The bits are masked on the 2-D tensor and only then viewed as
    blocks, and a block axis of size 1 is left out of the view: otherwise XLA:GPU writes the
    masked bits as transposed full-size copies before reducing them (BENCHMARKS.md,
    "Projected step time"), where this is one reduction reading x once."""
    padded, (bm, bk) = _padded(x, block)
    bits, dtype = _finite_abs_bits(padded)
    (m, k), view, axes = padded.shape, [], []
    for count, size in ((m // bm, bm), (k // bk, bk)):
        view.append(count)
        if size > 1:
            axes.append(len(view))
            view.append(size)
    return _float_of(jnp.max(bits.reshape(view), axis=tuple(axes)), dtype)


def quantize_blocks(
    x: jax.Array,
    block: tuple[int, int],
    fmt: Fp8Format,
    *,
    power_of_two: bool = False,
    margin: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """(q [M, K] FP8, scales [ceil(M/bm), ceil(K/bk)] FP32) with x ≈ q * expand(scales)."""
    if x.ndim != 2:
        raise ValueError(f"quantize_blocks expects a 2-D tensor, got shape {x.shape}")
    scales, eff = block_scales(x, block, fmt, power_of_two=power_of_two, margin=margin)
    q = quantize_with_scale(x, expand_scales(scales, eff, x.shape), fmt)
    return q, scales


def dequantize_blocks(q: jax.Array, scales: jax.Array, block: tuple[int, int]) -> jax.Array:
    """FP32 q * scales for a tensor quantized by `quantize_blocks` with `block`."""
    m, k = q.shape
    eff = (min(block[0], m), min(block[1], k))
    return q.astype(jnp.float32) * expand_scales(scales, eff, q.shape)
