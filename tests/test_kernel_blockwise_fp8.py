"""The blockwise FP8 Hopper kernel on CPU: GPU interpret mode against the reference, the
reference against the recipe's emulation (infir2_jax.fp8.dots), and lowering for CUDA at
every Qwen2.5-1.5B/7B projection shape. Speed and real FP8 tensor-core precision need a GPU.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import kernel_support  # tests/kernel_support.py (pytest puts tests/ on sys.path)
import numpy as np
import pytest

from infir2_jax.fp8.dots import Fp8Spec, blockwise_dot
from infir2_jax.fp8.quantize import E4M3, dequantize_blocks, quantize_blocks
from infir2_jax.kernels.blockwise_fp8 import (
    SCALE_BLOCK,
    TuningConfig,
    blockwise_fp8_matmul,
    blockwise_fp8_matmul_reference,
    expand_b_scale,
    tile_coordinates,
)

B = SCALE_BLOCK


# --------------------------------------------------------------------------- helpers
def _data(key, shape, block):
    """Normal data whose magnitude jumps by up to 2^±6 from one `block` to the next, so
    every scale differs and a scale applied to the wrong block shows."""
    k1, k2 = jax.random.split(key)
    nb = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    exps = jax.random.randint(k2, nb, -6, 7).astype(jnp.float32)
    factor = jnp.repeat(jnp.repeat(2.0**exps, block[0], 0), block[1], 1)[: shape[0], : shape[1]]
    return jax.random.normal(k1, shape, jnp.float32) * factor


def _operands(m, n, k, mode, *, power_of_two, seed=0):
    """Kernel operands quantized by the recipe's quantizer: A in 1x128 tiles, B [N, K] in
    128x128 blocks ("block") or 1x128 tiles of its columns ("column")."""
    ka, kb = jax.random.split(jax.random.key(seed))
    a_q, a_s = quantize_blocks(_data(ka, (m, k), (1, B)), (1, B), E4M3, power_of_two=power_of_two)
    b_block = (B, B) if mode == "block" else (1, B)
    b_q, b_s = quantize_blocks(_data(kb, (n, k), b_block), b_block, E4M3, power_of_two=power_of_two)
    return a_q, a_s, b_q, b_s


def _magnitude(a_q, a_s, b_q, b_s, mode):
    """|A| @ |B|ᵀ of the dequantized operands (float64): the scale of each output's
    rounding error, so tolerances hold where the sum cancels too."""
    k = a_q.shape[1]
    a = np.abs(np.asarray(dequantize_blocks(a_q, a_s, (1, B)), np.float64))
    b_cols = expand_b_scale(b_s, mode, b_q.shape[0])
    b = np.abs(np.asarray(b_q.astype(jnp.float32), np.float64))
    b = b * np.repeat(np.asarray(b_cols, np.float64), B, axis=1)[:, :k]
    return a @ b.T


def _assert_close(got, want, magnitude, *, out_dtype, rtol=1e-6):
    """|got - want| <= rtol * magnitude (+ half a bfloat16 ulp of want for bf16 output)."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    tol = rtol * magnitude + 1e-30
    if jnp.dtype(out_dtype) == jnp.bfloat16:
        tol = tol + 2.0**-8 * np.abs(want)
    excess = np.abs(got - want) - tol
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (
        f"at {worst}: got {got[worst]}, want {want[worst]}, tolerance {tol[worst]}"
    )


def test_tile_coordinates_visit_every_tile_once():
    for m_iters, n_iters, band_dim, width in itertools.product(
        (1, 2, 5), (1, 3, 8), ("m", "n"), (1, 2, 8)
    ):
        lin = jnp.arange(m_iters * n_iters, dtype=jnp.int32)
        mi, ni = tile_coordinates(lin, m_iters, n_iters, band_dim, width)
        seen = sorted(zip(np.asarray(mi).tolist(), np.asarray(ni).tolist(), strict=True))
        assert seen == list(itertools.product(range(m_iters), range(n_iters)))


# --------------------------------------------------------------------------- reference
def _blockwise_gemms(power_of_two, kernel, tokens=200, d_in=320, d_out=192):
    """(y, dx, dw) of `blockwise_dot` with `kernel`, and the operands for an independent check."""
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = _data(kx, (tokens, d_in), (8, B))
    w = _data(kw, (d_in, d_out), (B, B))
    g = _data(kg, (tokens, d_out), (8, B))
    spec = Fp8Spec(E4M3, E4M3, power_of_two=power_of_two, block=B, kernel=kernel)
    y, vjp = jax.vjp(lambda x_, w_: blockwise_dot(x_, w_, spec), x, w)
    return (y, *vjp(g)), (x, w, g)


@pytest.mark.parametrize("power_of_two", [False, True], ids=["f32_scales", "pow2_scales"])
def test_blockwise_dot_computes_infir2_block_scaled_gemms(power_of_two):
    """fprop, dgrad and wgrad of `blockwise_dot` (emulated) equal an independent computation:
    each operand quantized by the recipe's quantizer at InfiR2's granularity, dequantized, one
    FP32 dot — x·w, g·wᵀ, xᵀ·g; partial blocks in every dimension. This checks the operand
    layouts and scale modes `blockwise_dot` hands to the kernel and its reference."""
    (y, dx, dw), (x, w, g) = _blockwise_gemms(power_of_two, "emulated")

    def deq(t, block):
        q, s = quantize_blocks(t, block, E4M3, power_of_two=power_of_two)
        return dequantize_blocks(q, s, block), (q, s)

    x_deq, (qx, sx) = deq(x, (1, B))
    w_deq, (qw, sw) = deq(w, (B, B))
    g_deq, (qg, sg) = deq(g, (1, B))
    xt_deq, (qx_t, sx_t) = deq(x, (B, 1))  # wgrad: x and g in 128x1 tiles along tokens
    gt_deq, (qg_t, sg_t) = deq(g, (B, 1))
    hi = jax.lax.Precision.HIGHEST
    cases = {
        # name: (blockwise_dot's result, FP32 dot, the kernel's operands for the magnitude)
        "fprop": (y, jnp.dot(x_deq, w_deq, precision=hi), (qx, sx, qw.T, sw.T, "block")),
        "dgrad": (dx, jnp.dot(g_deq, w_deq.T, precision=hi), (qg, sg, qw, sw, "block")),
        "wgrad": (dw, jnp.dot(xt_deq.T, gt_deq, precision=hi),
                  (qx_t.T, sx_t.T, qg_t.T, sg_t.T, "column")),
    }  # fmt: skip
    for name, (got, want, operands) in cases.items():
        assert got.dtype == jnp.float32, name
        # Per-128-K sums vs one dot over K (their own orders): 2e-6 of |A|@|B| (seen: 6e-7);
        # a misplaced scale or block is off by O(1).
        _assert_close(got, want, _magnitude(*operands), out_dtype=jnp.float32, rtol=2e-6)


def test_blockwise_dot_runs_the_kernel_forward_and_backward():
    """The recipe's three GEMMs through the kernel (GPU interpreter) equal the emulation."""
    (y, dx, dw), (x, w, g) = kernel_support.run_interpreted(
        lambda: _blockwise_gemms(True, "interpret", tokens=256, d_in=256, d_out=128)
    )
    (ye, dxe, dwe), _ = _blockwise_gemms(True, "emulated", tokens=256, d_in=256, d_out=128)
    for name, got, want in (("fprop", y, ye), ("dgrad", dx, dxe), ("wgrad", dw, dwe)):
        scale = np.abs(np.asarray(want)).max()
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), atol=1e-5 * scale, err_msg=name
        )


# --------------------------------------------------------------------------- interpret
INTERPRET_CASES = {
    # 2x2 CTA tiles of 128x128 on 2 CTAs (two tiles each), partial M (the second tile's
    # upper warpgroup partly beyond M: TMA zero fill and clipped stores), partial N, 3 K
    # blocks (the last half empty: K padded to 384) through a 2-stage pipeline (slot reuse).
    "block-f32-edges": dict(
        shape=(200, 136, 320),
        mode="block",
        out_dtype=jnp.float32,
        power_of_two=False,
        config=TuningConfig(max_concurrent_steps=2, num_sms=2),
    ),
    # Warpgroups split along N (64x128 CTA tiles); M % 8, K % 16 and N % 8 all nonzero (the
    # wrapper pads A, B and the output, then slices); N-banded tile order.
    "column-bf16-padded": dict(
        shape=(70, 130, 200),
        mode="column",
        out_dtype=jnp.bfloat16,
        power_of_two=True,
        config=TuningConfig(wg_dimension="n", tile_n=64, band_dim="n", band_width=2, num_sms=2),
    ),
    # Block mode with 256-wide CTA tiles (each warpgroup its own weight block) past 512
    # columns (the second group of 4 block scales) and a warpgroup wholly beyond N.
    "block-bf16-wide": dict(
        shape=(64, 600, 256),
        mode="block",
        out_dtype=jnp.bfloat16,
        power_of_two=True,
        config=TuningConfig(wg_dimension="n", num_sms=2),
    ),
    # The default configuration (one CTA per tile), column scales, more K blocks than
    # pipeline stages.
    "column-f32-default": dict(
        shape=(128, 256, 640),
        mode="column",
        out_dtype=jnp.float32,
        power_of_two=False,
        config=None,
    ),
}


@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_kernel_interpreted_matches_reference(case):
    spec = INTERPRET_CASES[case]
    m, n, k = spec["shape"]
    mode, out_dtype = spec["mode"], spec["out_dtype"]
    a_q, a_s, b_q, b_s = _operands(m, n, k, mode, power_of_two=spec["power_of_two"])
    out = kernel_support.run_interpreted(
        lambda *ops: blockwise_fp8_matmul(
            *ops,
            b_scale_mode=mode,
            out_dtype=out_dtype,
            interpret=kernel_support.interpret_params(),
            config=spec["config"],
        ),
        a_q,
        a_s,
        b_q,
        b_s,
    )
    assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype)
    ref = blockwise_fp8_matmul_reference(
        a_q, a_s, b_q, b_s, b_scale_mode=mode, out_dtype=jnp.float32
    )
    _assert_close(out, ref, _magnitude(a_q, a_s, b_q, b_s, mode), out_dtype=out_dtype)


# --------------------------------------------------------------------------- lowering
QWEN_PROJECTIONS = {
    # model: {projection: (in, out)} of x [tokens, in] @ w [in, out]
    "1.5B": {"q_o": (1536, 1536), "kv": (1536, 256), "gate_up": (1536, 8960), "down": (8960, 1536)},
    "7B": {"q_o": (3584, 3584), "kv": (3584, 512), "gate_up": (3584, 18944), "down": (18944, 3584)},
}
TOKENS = (8192, 16384)


def _gemm(kind, tokens, d_in, d_out):
    """(M, N, K, b_scale_mode, out_dtype) of one of a projection's three GEMMs."""
    if kind == "fprop":  # [tokens, in] x [in, out]
        return tokens, d_out, d_in, "block", jnp.bfloat16
    if kind == "dgrad":  # [tokens, out] x [out, in]
        return tokens, d_in, d_out, "block", jnp.bfloat16
    return d_in, d_out, tokens, "column", jnp.float32  # wgrad: [in, tokens] x [tokens, out]


def _lower(m, n, k, mode, out_dtype, config=None):
    kb = -(-k // B)
    args = (
        jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((m, kb), jnp.float32),
        jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct(((-(-n // B)) if mode == "block" else n, kb), jnp.float32),
    )
    fn = lambda *ops: blockwise_fp8_matmul(  # noqa: E731
        *ops, b_scale_mode=mode, out_dtype=out_dtype, config=config
    )
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @mosaic_gpu", text), "no Mosaic GPU kernel in the lowering"
    return text


@pytest.mark.parametrize("model", QWEN_PROJECTIONS)
def test_lowers_for_cuda_at_every_qwen_projection_gemm(model):
    """Mosaic GPU lowering (layout inference, K-major 8-bit wgmma, TMA shapes) at the
    real fprop/dgrad/wgrad shapes; lowering only, nothing runs."""
    for (proj, (d_in, d_out)), tokens, kind in itertools.product(
        QWEN_PROJECTIONS[model].items(), TOKENS, ("fprop", "dgrad", "wgrad")
    ):
        m, n, k, mode, out_dtype = _gemm(kind, tokens, d_in, d_out)
        try:
            _lower(m, n, k, mode, out_dtype)
        except Exception as e:
            raise AssertionError(f"{model} {proj} {kind} tokens={tokens}: {e}") from e


@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_interpreted_configs_also_lower_for_cuda(case):
    """The interpreter does not apply Hopper's rules; every configuration it ran must lower."""
    spec = INTERPRET_CASES[case]
    _lower(*spec["shape"], spec["mode"], spec["out_dtype"], spec["config"])


# --------------------------------------------------------------------------- API errors
def test_rejects_bad_operands_and_configs():
    a_q, a_s, b_q, b_s = _operands(64, 128, 256, "block", power_of_two=False)
    call = lambda *ops, **kw: blockwise_fp8_matmul(*ops, **{"b_scale_mode": "block", **kw})  # noqa: E731
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        call(a_q.astype(jnp.float8_e5m2), a_s, b_q, b_s)
    with pytest.raises(ValueError, match="contraction mismatch"):
        call(a_q, a_s, b_q.T, b_s)
    with pytest.raises(ValueError, match="b_scale must have shape"):
        call(a_q, a_s, b_q, b_s, b_scale_mode="column")
    with pytest.raises(ValueError, match="out_dtype"):
        call(a_q, a_s, b_q, b_s, out_dtype=jnp.float16)
    with pytest.raises(ValueError, match="tile_n dividing 128"):
        call(a_q, a_s, b_q, b_s, config=TuningConfig(tile_n=192))
    with pytest.raises(ValueError, match="SMEM"):
        call(a_q, a_s, b_q, b_s, config=TuningConfig(max_concurrent_steps=8))
    with pytest.raises(ValueError, match="multiple of 64"):
        call(a_q, a_s, b_q, b_s, config=TuningConfig(tile_m=96))
