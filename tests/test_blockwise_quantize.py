"""The one-pass blockwise quantizer (infir2_jax/kernels/blockwise_quantize.py) in Pallas'
interpreter on the CPU, bit for bit against the reference quantizer, and compiled for an
H100 without a GPU (with a look at the PTX's division). Speed needs a GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from infir2_jax.compat import cuda_plugin, jaxlib_version, triton_target
from infir2_jax.fp8.dots import Fp8Spec, blockwise_dot
from infir2_jax.fp8.quantize import E4M3, E5M2, quantize_blocks
from infir2_jax.gpu_target import target_capability
from infir2_jax.kernels.blockwise_quantize import (
    COL,
    ROW,
    quantize_both,
    swiglu_grads_quantize_both,
    swiglu_quantize,
)
from infir2_jax.kernels.swiglu import swiglu, swiglu_grads

B = 128
needs_plugin = pytest.mark.skipif(
    cuda_plugin() is None,
    reason="CUDA plugin absent: pip install -r requirements-gpu-compile.txt",
)


def _data(shape, dtype, seed=0):
    """Normal values times 2^[-8, 8] per element (so every row's and column's amax differs
    inside a tile), with the values that need care: NaN and ±inf (ignored by the amax), a
    row of a tile with nothing finite (scale 1), an all-zero tile, values near the dtype's
    largest (scale near its top; clamped under a negative margin), exact zeros."""
    rng = np.random.default_rng(seed)
    m, k = shape
    x = rng.normal(size=shape) * 2.0 ** rng.integers(-8, 9, size=shape)
    x[rng.random(shape) < 0.05] = 0.0
    for value in (np.nan, np.inf, -np.inf):
        x.flat[rng.choice(x.size, size=max(1, x.size // 200), replace=False)] = value
    # amaxes of 7·2^k make exact power-of-two scales (fmt max 448 = 7·2^6; E5M2's 57344 =
    # 7·2^13), which rounding up must leave alone: row 4 (56) and column 6 (0.21875)
    x[4, :] = np.resize([56.0, -3.0, 1.5], k)
    x[:, 6] = np.resize([0.21875, -0.1, 0.05], m)
    x[1, : min(k, B)] = np.resize([np.nan, np.inf, -np.inf], min(k, B))
    x[-min(m, 40) :, -min(k, 40) :] = 0.0  # inside the last (edge) tile: an all-zero block
    if m > B and k > B:
        x[B : 2 * B, :B] = 0.0  # a whole zero tile
    huge = float(jnp.finfo(dtype).max) * 0.75
    x[2, 3], x[5, 0] = huge, -huge
    return jnp.asarray(x, dtype)


def _bits(a: jax.Array) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 4: np.uint32}[a.dtype.itemsize])


def _differ(got: jax.Array, want: jax.Array, nan_sign: bool = True) -> np.ndarray:
    """Where two arrays differ in their bits, but for NaN payloads: E5M2 has three NaNs per
    sign, and which one a cast writes is the platform's choice (XLA:CPU 0x7E, Pallas'
    interpreter and Hopper's cvt 0x7F); a NaN must stay a NaN of the same sign (unless
    `nan_sign` is False: a NaN the arithmetic made, as inf · 0, has no defined sign)."""
    g, w = _bits(got), _bits(want)
    g_nan = np.isnan(np.asarray(got, np.float32))
    w_nan = np.isnan(np.asarray(want, np.float32))
    sign = np.uint8(0x80)
    same_nan = g_nan & w_nan
    if nan_sign and g.itemsize == 1:
        same_nan &= (g & sign) == (w & sign)
    return np.argwhere((g != w) & ~same_nan)


def _reference(x, fmt, power_of_two, margin, block=B):
    kw = dict(power_of_two=power_of_two, margin=margin)
    q_row, s_row = quantize_blocks(x, (1, block), fmt, **kw)
    q_col, s_col = quantize_blocks(x, (block, 1), fmt, **kw)
    return q_row, s_row, q_col.T, s_col.T


CASES = {
    # shape, input dtype, format, power-of-two scales, margin[, block (else 128)]
    "256x384 e4m3 pow2": ((256, 384), jnp.bfloat16, E4M3, True, 0),
    "256x384 e4m3 exact": ((256, 384), jnp.bfloat16, E4M3, False, 0),
    "200x130 e4m3 exact margin 1": ((200, 130), jnp.bfloat16, E4M3, False, 1),
    "200x130 e5m2 pow2 margin -2": ((200, 130), jnp.bfloat16, E5M2, True, -2),
    "200x130 f32 e4m3 exact": ((200, 130), jnp.float32, E4M3, False, 0),
    "64x96 e5m2 exact": ((64, 96), jnp.bfloat16, E5M2, False, 0),
    "64x96 e4m3 pow2 margin 3": ((64, 96), jnp.bfloat16, E4M3, True, 3),
    "200x130 e4m3 exact block 32": ((200, 130), jnp.bfloat16, E4M3, False, 0, 32),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_the_reference_quantizer_bit_for_bit(case):
    shape, dtype, fmt, power_of_two, margin, *block = CASES[case]
    block = block[0] if block else B
    x = _data(shape, dtype, seed=len(case))
    kw = dict(power_of_two=power_of_two, margin=margin, block=block)
    got = jax.jit(lambda x: quantize_both(x, fmt, interpret=True, **kw))(x)
    want = _reference(x, fmt, **kw)
    for name, g, w in zip(("q_row", "s_row", "q_col_t", "s_col_t"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype)
        mismatch = _differ(g, w)
        assert mismatch.size == 0, f"{name}: {len(mismatch)} differ, first at {mismatch[:3]}"


def test_data_exercises_what_it_claims():
    """The inputs above hold every special case (else the bit-identity proves less)."""
    x = np.asarray(_data((256, 384), jnp.bfloat16), np.float32)
    assert np.isnan(x).any() and np.isposinf(x).any() and np.isneginf(x).any()
    assert not np.isfinite(x[1, :B]).any()  # a row of a tile with nothing finite
    assert not x[B : 2 * B, :B].any() and not x[-40:, -40:].any()
    q_row, s_row, _, s_col_t = _reference(jnp.asarray(x, jnp.bfloat16), E4M3, False, -1)
    assert (np.asarray(s_row) == 1).any() and (np.asarray(s_col_t) == 1).any()
    assert (np.abs(np.asarray(q_row, np.float32)) == E4M3.max).any()  # something clamped
    _, s_row, _, s_col_t = _reference(jnp.asarray(x, jnp.bfloat16), E4M3, False, 0)
    assert s_row[4, 0] == 2.0**-3 and s_col_t[6, 0] == 2.0**-11  # powers of two already


SWIGLU_CASES = {
    # shape, format, power-of-two scales, margin
    "200x130 e4m3 pow2": ((200, 130), E4M3, True, 0),
    "256x384 e5m2 exact margin 1": ((256, 384), E5M2, False, 1),
}


@pytest.mark.parametrize("case", SWIGLU_CASES)
def test_swiglu_kernels_equal_swiglu_then_the_reference_quantizer(case):
    """The kernels that compute SwiGLU (or its two input gradients) tile by tile and quantize
    it: bit for bit `quantize_blocks` of what `swiglu` (or its backward pass) writes in BF16,
    on inputs holding NaN, ±inf, zeros and values near BF16's largest."""
    shape, fmt, power_of_two, margin = SWIGLU_CASES[case]
    gate, up, dh = (_data(shape, jnp.bfloat16, seed=len(case) + n) for n in range(3))
    kw = dict(power_of_two=power_of_two, margin=margin)
    got = jax.jit(lambda g, u: swiglu_quantize(g, u, fmt, interpret=True, **kw))(gate, up)
    want = _reference(swiglu(gate, up), fmt, **kw)
    grads = jax.jit(swiglu_grads)
    got += jax.jit(lambda g, u, d: swiglu_grads_quantize_both(g, u, d, fmt, interpret=True, **kw))(
        gate, up, dh
    )
    want += sum((_reference(t, fmt, **kw) for t in grads(gate, up, dh)), ())
    # One copy alone (the MLP block's forward asks for the row copy, its backward for the
    # column copy): the same bits as that copy of both.
    for copies, part in (((ROW,), slice(0, 2)), ((COL,), slice(2, 4))):
        one = jax.jit(
            lambda g, u, c=copies: swiglu_quantize(g, u, fmt, copies=c, interpret=True, **kw)
        )(gate, up)
        got += one
        want += want[part]
    assert len(got) == len(want) == 16
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, (n, g.shape, w.shape)
        # SwiGLU and its gradients at gate = ±inf are NaN (inf · 0), of either sign
        differ = _differ(g, w, nan_sign=False)
        assert not len(differ), (n, differ[:5])


def test_rejects_what_it_does_not_take():
    x = jnp.zeros((64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="2-D"):
        quantize_both(x[None], E4M3, interpret=True)
    with pytest.raises(ValueError, match="power of two >= 16"):
        quantize_both(x, E4M3, block=96, interpret=True)
    for copies in ((), (ROW, ROW), ("rows",)):
        with pytest.raises(ValueError, match="copies .* must name 'row' and/or 'col'"):
            swiglu_quantize(x, x, E4M3, copies=copies, interpret=True)


# Compiled for an H100 in a process of its own (XLA reads the dump flag when it starts).
_COMPILE = """
import jax, jax.numpy as jnp
from infir2_jax.compat import triton_target
from infir2_jax.fp8.quantize import FORMATS
from infir2_jax.gpu_target import gpu_devices, target_capability
from infir2_jax.kernels.blockwise_quantize import (
    quantize_both, swiglu_grads_quantize_both, swiglu_quantize)

device = gpu_devices("h100", 1)[0]
x = jax.ShapeDtypeStruct((16384, 8960), jnp.bfloat16,
                         sharding=jax.sharding.SingleDeviceSharding(device))
kernels = dict(
    quantize_both=lambda x: quantize_both(x, FORMATS["{fmt}"], power_of_two={power_of_two}),
    swiglu_grads=lambda x: swiglu_grads_quantize_both(
        x, x + 1, x - 1, FORMATS["{fmt}"], power_of_two={power_of_two}),
    swiglu_col=lambda x: swiglu_quantize(
        x, x + 1, FORMATS["{fmt}"], copies=("col",), power_of_two={power_of_two}),
)
with triton_target(target_capability("h100")):
    print(jax.jit(kernels["{kernel}"]).trace(x).lower().compile().as_text())
"""


@needs_plugin
@pytest.mark.parametrize(
    "kernel, fmt, power_of_two",
    [("quantize_both", "e4m3", False), ("quantize_both", "e5m2", True),
     ("swiglu_grads", "e5m2", False), ("swiglu_col", "e4m3", True)],
)  # fmt: skip
def test_compiles_for_hopper_at_a_qwen_shape_with_ieee_division(
    tmp_path, kernel, fmt, power_of_two
):
    """[16384, 8960] (Qwen2.5-1.5B's MLP activations at 16k tokens) compiled for an H100:
    one Triton kernel writing both FP8 copies and their scales (SwiGLU's gradients: both,
    for each of the two; SwiGLU's output as the MLP's backward pass asks for it: the column
    copy only). In the PTX, every f32 division is IEEE `div.rn` (Triton's own `/` is the
    approximate `div.full`; SwiGLU's sigmoid divides too), and the casts are
    round-to-nearest-even."""
    script = textwrap.dedent(_COMPILE).format(fmt=fmt, power_of_two=power_of_two, kernel=kernel)
    env = {
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": f"--xla_dump_to={tmp_path}",
    }
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    calls = [line for line in r.stdout.splitlines() if "custom-call(" in line]
    assert len(calls) == 1 and "__gpu$xla.gpu.triton" in calls[0], calls
    fp8 = "f8e4m3fn" if fmt == "e4m3" else "f8e5m2"
    row, col = (f"{fp8}[16384,8960]", "f32[16384,70]"), (f"{fp8}[8960,16384]", "f32[8960,128]")
    tensors = 2 if kernel == "swiglu_grads" else 1
    for out in row + col:
        expected = 0 if kernel == "swiglu_col" and out in row else tensors
        assert calls[0].count(out) == expected, (out, calls[0])
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    if not ptx and jaxlib_version() >= (0, 12):
        return  # jax 0.12's XLA dumps no Triton PTX; the main lane (jax 0.10) reads it
    assert "div.rn.f32" in ptx
    assert "div.full" not in ptx and "div.approx" not in ptx
    assert f"cvt.rn.satfinite.{fmt}x2.f32" in ptx


# The recipe's choice of quantizer, as `_block_matmul` chooses its GEMM: lowered for CUDA,
# how many one-pass kernels a forward + backward pass of blockwise_dot holds (x and g).
DISPATCH = {
    "auto, unbound": ("auto", None, {"cuda": 2, "cpu": 0}),
    "auto, bound to cuda": ("auto", "cuda", {"cuda": 2}),
    "auto, bound to cpu": ("auto", "cpu", {"cuda": 0}),
    "emulated": ("emulated", None, {"cuda": 0}),
    "pallas": ("pallas", None, {"cuda": 2}),
}


@pytest.mark.parametrize("case", DISPATCH)
def test_blockwise_recipe_quantizes_with_the_kernel_on_cuda_only(case):
    kernel, platform, expected = DISPATCH[case]
    spec = Fp8Spec(E4M3, E4M3, power_of_two=True, kernel=kernel, platform=platform)
    step = jax.grad(lambda x, w: blockwise_dot(x, w, spec).astype(jnp.float32).sum(), (0, 1))
    args = (jax.ShapeDtypeStruct((256, 256), jnp.bfloat16),) * 2
    for lowered_for, count in expected.items():
        with triton_target(target_capability("h100")):  # jax >= 0.11 asks for a GPU's kind
            text = jax.jit(step).trace(*args).lower(lowering_platforms=(lowered_for,)).as_text()
        assert text.count('name = "blockwise_quantize_both"') == count, (lowered_for, count)


def test_recipe_refuses_a_block_the_kernel_does_not_take():
    spec = Fp8Spec(E4M3, E4M3, block=96, kernel="pallas")
    x = jnp.ones((96, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match="powers of two >= 16 .*fp8.blockwise_kernel=emulated"):
        blockwise_dot(x, x, spec)


def test_lowers_for_cuda_inside_a_shard_map():
    """Under tensor or FSDP parallelism the recipe runs per device in a shard_map (with its
    varying-axes check on): the kernel's results vary over the axes its input varies over."""
    mesh = jax.make_mesh((1,), ("tokens",), devices=jax.devices()[:1])
    spec = jax.sharding.PartitionSpec("tokens")
    per_device = jax.shard_map(
        lambda x: quantize_both(x, E4M3, power_of_two=True), mesh=mesh, in_specs=spec,
        out_specs=(spec, spec, jax.sharding.PartitionSpec(None, "tokens"),
                   jax.sharding.PartitionSpec(None, "tokens")),
    )  # fmt: skip
    sharded = jax.sharding.NamedSharding(mesh, spec)
    x = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16, sharding=sharded)
    with triton_target(target_capability("h100")):
        text = jax.jit(per_device).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count('name = "blockwise_quantize_both"') == 1
