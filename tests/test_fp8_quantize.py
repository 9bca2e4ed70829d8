"""FP8 quantizers against hand-computed references (numpy + ml_dtypes casts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from infir2_jax.compat import scan_num_consts
from infir2_jax.fp8 import E4M3, E5M2, dequantize_blocks, quantize_blocks, scale_from_amax
from infir2_jax.fp8.dots import Fp8Spec, current_scaling_dot
from infir2_jax.fp8.quantize import (
    finite_amax,
    pow2_exponents,
    pow2_from_exponents,
    quantize_with_scale,
    round_up_pow2,
)

# XLA compiles `amax / 448` as `amax * (1/448)`, which can differ from the IEEE quotient in the
# last bit; scales are compared to 1 ulp (FP32: 2^-23 relative). Power-of-two scales are exact.
ULP = 2.0**-23


def _ref_quantize(x: np.ndarray, scale: float, fmt_max: float, dtype) -> np.ndarray:
    return np.clip(x.astype(np.float32) / np.float32(scale), -fmt_max, fmt_max).astype(dtype)


def test_per_tensor_scale_and_values_by_hand():
    x = np.array([[1.0, -3.0], [0.3, 2.0]], np.float32)
    q, s = quantize_blocks(jnp.asarray(x), x.shape, E4M3)
    np.testing.assert_allclose(float(s[0, 0]), np.float32(3.0) / np.float32(448.0), rtol=ULP)
    expected = _ref_quantize(x, float(s[0, 0]), 448.0, ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), expected.astype(np.float32))
    assert float(np.asarray(q)[0, 1].astype(np.float32)) == -448.0  # amax maps to the format max

    q2, s2 = quantize_blocks(jnp.asarray(x), x.shape, E4M3, power_of_two=True)
    assert float(s2[0, 0]) == 2.0**-7  # 3/448 = 2^-7.22 -> rounded up to 2^-7
    assert np.asarray(q2)[0, 1].astype(np.float32) == -384.0  # -3 / 2^-7


def test_power_of_two_rounding_is_exact():
    s = jnp.asarray([2.0**-7, 2.0**-7 * 1.0000001, 0.75, 1.0, 3.0, 2.0**-30], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(round_up_pow2(s)), [2.0**-7, 2.0**-6, 1.0, 1.0, 4.0, 2.0**-30]
    )


def test_margin_and_e5m2():
    s = scale_from_amax(jnp.asarray(57344.0), E5M2, margin=2)
    assert float(s) == 4.0
    assert float(scale_from_amax(jnp.asarray(448.0), E4M3, margin=-1)) == 0.5


def test_clamping_zero_tiles_and_nonfinite_inputs():
    # Clamp: a scale from a stale (smaller) amax must saturate, never produce NaN.
    q = quantize_with_scale(jnp.asarray([1000.0, -1000.0]), jnp.asarray(1.0), E4M3)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), [448.0, -448.0])
    # An all-zero tile gets scale 1 and zeros.
    x = np.zeros((2, 256), np.float32)
    x[:, 128:] = 5.0
    q, s = quantize_blocks(jnp.asarray(x), (1, 128), E4M3)
    np.testing.assert_array_equal(np.asarray(s)[:, 0], [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(s)[:, 1], 5.0 / 448.0)
    assert not np.asarray(q)[:, :128].astype(np.float32).any()
    # NaN/inf are ignored by amax (the scale stays that of the finite values); in the data
    # NaN stays NaN and inf saturates.
    y = jnp.asarray([[2.0, np.nan, np.inf, -1.0]])
    q, s = quantize_blocks(y, (1, 4), E4M3)
    np.testing.assert_allclose(float(s[0, 0]), np.float32(2.0) / np.float32(448.0), rtol=ULP)
    values = np.asarray(q).astype(np.float32)[0]
    assert values[0] == 448.0 and np.isnan(values[1]) and values[2] == 448.0


@pytest.mark.parametrize("shape", [(3, 200), (130, 256), (1, 100)])
def test_activation_tiles_by_hand(shape):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * rng.uniform(0.01, 100, size=(shape[0], 1))).astype(np.float32)
    q, s = quantize_blocks(jnp.asarray(x), (1, 128), E4M3, power_of_two=True)
    tiles = -(-shape[1] // 128)
    assert s.shape == (shape[0], tiles)
    for r in range(shape[0]):
        for t in range(tiles):
            tile = x[r, t * 128 : (t + 1) * 128]
            scale = 2.0 ** np.ceil(np.log2(np.abs(tile).max() / 448.0))
            assert float(s[r, t]) == scale
            expected = _ref_quantize(tile, scale, 448.0, ml_dtypes.float8_e4m3fn)
            got = np.asarray(q)[r, t * 128 : (t + 1) * 128]
            np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32))


@pytest.mark.parametrize("shape", [(200, 130), (256, 128), (64, 300)])
def test_weight_blocks_by_hand(shape):
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    q, s = quantize_blocks(jnp.asarray(w), (128, 128), E4M3)  # exact FP32 scales
    blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
    assert s.shape == blocks
    for i in range(blocks[0]):
        for j in range(blocks[1]):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            amax = np.float32(np.abs(block).max())
            np.testing.assert_allclose(float(s[i, j]), amax / np.float32(448.0), rtol=ULP)
    deq = np.asarray(dequantize_blocks(q, s, (128, 128)))
    # E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values.
    err = np.abs(deq - w) / np.maximum(np.abs(w), 1e-30)
    big = np.abs(w) > np.asarray(s).max() * 2**-6  # above E4M3's subnormal range
    assert err[big].max() <= 2**-4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_finite_amax_ignores_nonfinite_in_every_input_dtype(dtype):
    x = np.array([[1.0, -3.0, np.inf, 0.0], [np.nan, -np.inf, 2.5, -0.0]], np.float32)
    got = finite_amax(jnp.asarray(x, dtype), axis=1)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), [3.0, 2.5])
    assert float(finite_amax(jnp.asarray([np.nan, -np.inf], dtype))) == 0.0
    rng = np.random.default_rng(0)
    small, large = (1e-4, 6e3) if dtype == jnp.float16 else (1e-30, 3e4)  # within range
    for scale in (small, 1.0, large):
        r = jnp.asarray(rng.normal(size=(300,)) * scale, dtype)
        finite = np.abs(np.asarray(r.astype(jnp.float32)))
        assert float(finite_amax(r)) == finite[np.isfinite(finite)].max()


def test_amax_in_a_layer_scan_leaves_no_full_size_constant_outside_the_loop():
    """JAX's scan partial evaluation hoists loop-invariant values out of the loop; a
    `where(isfinite, |x|, 0)` amax would hoist its zeros, an FP32 array the size of x that
    then lives through the whole scan (560 MiB per 1.5B MLP activation at 8k x 2)."""
    spec = Fp8Spec(E4M3, E5M2)

    def loss(ws, x):
        y, _ = jax.lax.scan(lambda x, w: (current_scaling_dot(x, w, spec), None), x, ws)
        return y.astype(jnp.float32).sum()

    x = jnp.ones((40, 48), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(jnp.ones((3, 48, 48), jnp.bfloat16), x)
    forward_scan = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")
    consts = forward_scan.invars[: scan_num_consts(forward_scan.params)]
    assert all(v.aval.size < x.size for v in consts), [str(v.aval) for v in consts]


def test_power_of_two_scales_kept_as_exponents_round_trip_exactly():
    """Blockwise keeps power-of-two wgrad scales as int16 exponents until the backward.
    (Normal range: XLA flushes subnormal FP32 to zero, as it does for the scales themselves.)"""
    exponents = np.array([-126, -125, -30, -7, 0, 1, 20, 126, 127], np.int32)
    scales = jnp.asarray(np.ldexp(np.float32(1), exponents), jnp.float32)
    packed = pow2_exponents(scales)
    assert packed.dtype == jnp.int16
    np.testing.assert_array_equal(np.asarray(packed), exponents)
    np.testing.assert_array_equal(np.asarray(pow2_from_exponents(packed)), np.asarray(scales))
