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
    dtype = jnp.dtype(x.dtype)
    if dtype not in _INT_OF:
        x, dtype = x.astype(jnp.float32), jnp.dtype(jnp.float32)
    int_dtype, inf_bits = _INT_OF[dtype]
    bits = jax.lax.bitcast_convert_type(jnp.abs(x), int_dtype)
    amax_bits = jnp.max(bits * (bits < inf_bits).astype(int_dtype), axis=axis, keepdims=keepdims)
    return jax.lax.bitcast_convert_type(amax_bits, dtype).astype(jnp.float32)


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


def _blocked(x: jax.Array, block: tuple[int, int]) -> tuple[jax.Array, tuple[int, int]]:
    """[M, K] zero-padded to block multiples and viewed as [M/bm, bm, K/bk, bk]."""
    m, k = x.shape
    bm, bk = min(block[0], m), min(block[1], k)
    pm, pk = -m % bm, -k % bk
    padded = jnp.pad(x, ((0, pm), (0, pk))) if pm or pk else x
    return padded.reshape((m + pm) // bm, bm, (k + pk) // bk, bk), (bm, bk)


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
    blocks, eff = _blocked(x, block)
    amax = finite_amax(blocks, axis=(1, 3))
    return scale_from_amax(amax, fmt, power_of_two=power_of_two, margin=margin), eff


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
