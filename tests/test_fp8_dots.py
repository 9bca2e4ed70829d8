"""Scaled FP8 matmuls: gradients against FP32, blockwise against a numpy reference, the HLO
really holding FP8 dots, BF16 layers, and the recipe registry's errors."""

from __future__ import annotations

import contextlib
import io
import re
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from infir2_jax.config import FP8Config, load_config
from infir2_jax.fp8 import make_gemm
from infir2_jax.model import ExecutionConfig, Qwen2, preset, resolve_plan
from infir2_jax.model.parts import init_params, split_model
from infir2_jax.train.optimizer import learning_rate_schedule, make_optimizer
from infir2_jax.train.state import init_state, make_train_step

# Unit roundoff of each format: 2^-(mantissa bits + 1).
U = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
# (fwd operand format, bwd gradient format) per recipe with its default "format".
FORMATS = {
    "current": ("e4m3", "e5m2"),
    "delayed": ("e4m3", "e5m2"),
    "rowwise": ("e4m3", "e5m2"),
    "blockwise": ("e4m3", "e4m3"),
}


def _bound(a: str, b: str) -> float:
    """Relative Frobenius error allowed for a product of operands rounded to formats a, b.

    Each element carries a relative rounding error δ with |δ| <= u (uniform-ish, so
    E[δ²] <= u²/3); the errors of a and b add, and summing many products with random signs
    keeps the relative norm error near sqrt(E[(δa+δb)²]) = sqrt((ua²+ub²)/3). We allow √3
    times that, sqrt(ua² + ub²), which real FP8 arithmetic stays well inside."""
    return float(np.hypot(U[a], U[b]))


def _linear_fn(recipe: str, grad_amax: float = 1.0):
    gemm = make_gemm(FP8Config(recipe=recipe))
    if not gemm.stateful:
        return lambda x, w: gemm(x, w)
    # Delayed: a history holding this data's amaxes (as after a step on the same data).
    state = gemm.init_state()
    probe = state["fp8_probe"][...]

    def f(x, w):
        history = jnp.zeros_like(state["fp8_history"][...])
        amax = jnp.stack([jnp.max(jnp.abs(x)), jnp.max(jnp.abs(w)), grad_amax])
        history = history.at[:, 0].set(jax.lax.stop_gradient(amax))
        return gemm(x, w, {"fp8_history": history, "fp8_probe": probe})

    return f


@pytest.mark.parametrize("recipe", sorted(FORMATS))
def test_gradients_match_float32_within_format_bound(recipe):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(150, 200)), jnp.float32)  # not multiples of 128
    w = jnp.asarray(rng.normal(size=(200, 130)) * 0.05, jnp.float32)
    r = jnp.asarray(rng.normal(size=(150, 130)), jnp.float32)  # the output gradient g
    f = _linear_fn(recipe, grad_amax=float(jnp.max(jnp.abs(r))))

    def rel(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    y = f(x, w)
    dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w) * r), (0, 1))(x, w)
    fwd, bwd = FORMATS[recipe]
    for got, want, formats in (
        (y, x @ w, (fwd, fwd)),
        (dx, r @ w.T, (bwd, fwd)),
        (dw, x.T @ r, (fwd, bwd)),
    ):
        error = rel(got, want)
        assert error <= _bound(*formats), (recipe, formats, error)
        assert error > 1e-3, "no quantization happened"  # FP32 would give ~1e-7


def _numpy_block_quant(a: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Independent reference: dequantized E4M3 with power-of-two block scales."""
    out = np.empty_like(a, dtype=np.float64)
    for i in range(0, a.shape[0], block[0]):
        for j in range(0, a.shape[1], block[1]):
            tile = a[i : i + block[0], j : j + block[1]].astype(np.float32)
            amax = np.abs(tile).max()
            s = 2.0 ** np.ceil(np.log2(amax / 448.0)) if amax > 0 else 1.0
            q = np.clip(tile / np.float32(s), -448, 448).astype(ml_dtypes.float8_e4m3fn)
            out[i : i + block[0], j : j + block[1]] = q.astype(np.float64) * s
    return out


def test_blockwise_equals_numpy_reference_in_all_three_gemms():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(140, 260)).astype(np.float32) * rng.uniform(0.1, 10, size=(140, 1)).astype(
        np.float32
    )
    w = (rng.normal(size=(260, 200)) * 0.05).astype(np.float32)
    g = rng.normal(size=(140, 200)).astype(np.float32)
    f = _linear_fn("blockwise")
    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    w_blocks = _numpy_block_quant(w, (128, 128))
    expected_y = _numpy_block_quant(x, (1, 128)) @ w_blocks  # fprop: 1x128 tiles along K
    expected_dx = _numpy_block_quant(g, (1, 128)) @ w_blocks.T  # dgrad: same weight blocks
    expected_dw = _numpy_block_quant(x, (128, 1)).T @ _numpy_block_quant(g, (128, 1))  # wgrad
    for got, want in ((y, expected_y), (dx, expected_dx), (dw, expected_dw)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _f8_dot_count(text: str) -> int:
    """dot_general ops whose two operands are FP8 tensors, in StableHLO text."""
    count = 0
    for line in text.splitlines():
        if "stablehlo.dot_general" in line:
            operands = re.search(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)", line)
            if operands and all("f8E" in t for t in operands.groups()):
                count += 1
    return count


@pytest.mark.parametrize(
    "recipe,expected",
    [("delayed", 21), ("current", 21), ("rowwise", 21), ("none", 0), ("blockwise", 0)],
)
def test_train_step_hlo_has_21_fp8_dots_per_layer(recipe, expected):
    """7 projections × (fprop, dgrad, wgrad). Layers are scanned, so the lowered step holds
    the layer body once: 21 FP8 dots in total, whatever the depth."""
    cfg = load_config("tiny_cpt", [f"fp8.recipe={recipe}", "execution.remat=none"])
    plan = resolve_plan(cfg.model, cfg.execution, gemm=make_gemm(cfg.fp8))
    optimizer = make_optimizer(cfg.optim, 10)
    step = make_train_step(
        split_model(cfg.model, plan), optimizer, learning_rate_schedule(cfg.optim, 10)
    )
    state = jax.eval_shape(lambda: init_state(*init_params(cfg.model, 0, plan), optimizer))
    batch = {
        k: jax.ShapeDtypeStruct((2, 64), jnp.int32)
        for k in ("input_ids", "labels", "positions", "segment_ids", "loss_mask")
    }
    assert _f8_dot_count(jax.jit(step).lower(state, batch).as_text()) == expected


@pytest.mark.parametrize("recipe", ["current", "blockwise"])  # blockwise: the fused MLP's switch
def test_bf16_layers_run_without_fp8(recipe):
    cfg = preset("tiny").replace(dtype="float32", num_layers=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 40)))
    reference = Qwen2(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(reference, nnx.Param)

    def logits(fp8: FP8Config):
        model = Qwen2(cfg, rngs=nnx.Rngs(0), plan=resolve_plan(cfg, gemm=make_gemm(fp8)))
        nnx.update(model, state)
        return np.asarray(model(ids))

    bf16 = np.asarray(reference(ids))
    all_fp8 = logits(FP8Config(recipe=recipe))
    assert np.abs(all_fp8 - bf16).max() > 1e-3
    np.testing.assert_allclose(
        logits(FP8Config(recipe=recipe, bf16_layers=(0, 1, -1))), bf16, atol=1e-5
    )
    partial = logits(FP8Config(recipe=recipe, bf16_layers=(0, -1)))
    assert 0 < np.abs(partial - bf16).max() < np.abs(all_fp8 - bf16).max() * 2
    with pytest.raises(ValueError, match="bf16_layers"):
        make_gemm(FP8Config(recipe=recipe, bf16_layers=(5,))).layer_mask(3)


def test_the_fp8_switch_branches_only_when_some_layer_is_bf16():
    """Each layer's FP8 switch is a variable of its projections: with BF16 layers the scan
    body chooses per layer (a `cond`); without, there is no switch and no branch."""
    cfg = preset("tiny").replace(num_layers=2)
    ids = jnp.zeros((1, 16), jnp.int32)

    def jaxpr(fp8: FP8Config) -> str:
        model = Qwen2(cfg, rngs=nnx.Rngs(0), plan=resolve_plan(cfg, gemm=make_gemm(fp8)))
        return str(jax.make_jaxpr(lambda i: model(i))(ids))

    assert " cond[" not in jaxpr(FP8Config(recipe="current"))
    assert " cond[" in jaxpr(FP8Config(recipe="current", bf16_layers=(0,)))


@pytest.mark.parametrize("contract", [(1, 0), (1, 1), (0, 0)])  # fprop, dgrad, wgrad
def test_gpu_form_of_per_tensor_dots_computes_the_same_product(contract):
    """The dequantized form the GPU lowering uses (`_dequantized_dot`) is the same product as
    the rescaled form the CPU runs, for each GEMM's contraction: with power-of-two scales the
    BF16 dequantization is exact, so both are the FP32 product rounded once to BF16."""
    from infir2_jax.fp8.dots import _dequantized_dot, _rescaled_dot

    rng = np.random.default_rng(0)
    qa = jnp.asarray(rng.normal(size=(48, 40)) * 8, jnp.float8_e4m3fn)
    shape_b = {(1, 0): (40, 24), (1, 1): (24, 40), (0, 0): (48, 24)}[contract]
    qb = jnp.asarray(rng.normal(size=shape_b) * 8, jnp.float8_e5m2)
    sa, sb = jnp.float32(2.0**-5), jnp.float32(2.0**3)
    gpu_form = _dequantized_dot(qa, sa, qb, sb, contract, jnp.bfloat16)
    cpu_form = _rescaled_dot(qa, sa, qb, sb, contract, jnp.bfloat16)
    assert gpu_form.dtype == cpu_form.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(gpu_form, np.float32), np.asarray(cpu_form, np.float32)
    )


@pytest.mark.parametrize("recipe", ["current", "rowwise", "blockwise"])
def test_projections_sharing_an_input_equal_separate_gemms(recipe):
    """`many` (q, k, v; gate, up) quantizes x once: each output and each wgrad is exactly the
    separate GEMM's; x's gradient is the sum of the separate dgrads (to FP32 rounding)."""
    gemm = make_gemm(FP8Config(recipe=recipe))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(136, 256)), jnp.float32)
    ws = tuple(jnp.asarray(rng.normal(size=(256, n)) * 0.05, jnp.float32) for n in (256, 128, 72))
    cs = tuple(jnp.asarray(rng.normal(size=(136, w.shape[1])), jnp.float32) for w in ws)

    def shared(x, ws):
        return sum(jnp.sum(y * c) for y, c in zip(gemm.many(x, ws), cs, strict=True))

    def separate(x, ws):
        return sum(jnp.sum(gemm(x, w) * c) for w, c in zip(ws, cs, strict=True))

    ys_shared = gemm.many(x, ws)
    for y, w in zip(ys_shared, ws, strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(gemm(x, w)))
    (dx_a, dws_a), (dx_b, dws_b) = (jax.grad(f, (0, 1))(x, ws) for f in (shared, separate))
    for a, b in zip(dws_a, dws_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(dx_a), np.asarray(dx_b), rtol=1e-6, atol=1e-6)


def _layer_residuals(recipe: str, tokens: int = 256) -> list:
    """(dtype, size) of every activation (a value with a `tokens` dimension) a decoder
    layer's backward pass keeps, without remat; FP8 weights are not counted."""
    from jax._src.ad_checkpoint import saved_residuals

    from infir2_jax.model import DecoderLayer
    from infir2_jax.model.rope import rope_tables

    # chunked attention recomputes its scores: what is left is the projections' business
    cfg = preset("tiny")
    execution = ExecutionConfig(attention_impl="chunked", attention_chunk_size=tokens // 2)
    plan = resolve_plan(cfg, execution, gemm=make_gemm(FP8Config(recipe=recipe)))
    layer = DecoderLayer(cfg, rngs=nnx.Rngs(0), plan=plan)
    graphdef, state = nnx.split(layer)
    rope = rope_tables(jnp.arange(tokens)[None], cfg.head_dim, cfg.rope_theta, jnp.bfloat16)
    index, segments = jnp.arange(tokens, dtype=jnp.int32), jnp.ones((1, tokens), jnp.int32)

    def f(state, x):
        y = nnx.merge(graphdef, state)(x, rope, index, segments)
        return y.astype(jnp.float32).sum()

    x = jnp.ones((1, tokens, cfg.hidden_size), jnp.bfloat16)
    residuals = [a for a, _ in saved_residuals(f, state, x)]
    return [(a.dtype, a.size) for a in residuals if tokens in a.shape], cfg


@pytest.mark.parametrize("recipe", ["none", "current", "blockwise"])
def test_decoder_layer_backward_keeps_fp8_gemm_inputs_once_and_no_fp32_activations(recipe):
    """What FP8 saves memory with: each GEMM input the backward needs is kept once, in FP8
    (q/k/v and gate/up share theirs; `blockwise` not even down's), no FP32 copy of an
    activation is kept (RMSNorm recomputes its statistics), and SwiGLU keeps only gate and
    up."""
    tokens = 256
    residuals, cfg = _layer_residuals(recipe, tokens)
    hidden, ffn = tokens * cfg.hidden_size, tokens * cfg.intermediate_size
    f8 = [size for dtype, size in residuals if jnp.dtype(dtype).itemsize == 1]
    assert not [s for d, s in residuals if d == jnp.float32 and s >= hidden]
    if recipe == "none":
        assert not f8
        assert sum(size == ffn for _, size in residuals) == 3  # gate, up, down's input
        return
    if recipe == "blockwise":
        # attention input, o_proj input, MLP input. The MLP block keeps no copy of down's
        # input: its backward pass quantizes it again from gate and up (BF16, kept for SwiGLU).
        assert sorted(f8) == [hidden, hidden, hidden]
        assert sum(size == ffn for _, size in residuals) == 2
        return
    # attention input, o_proj input, MLP input; down_proj input
    assert sorted(f8) == [hidden, hidden, hidden, ffn]
    assert sum(size == ffn for _, size in residuals) == 3  # gate, up (BF16), down's (FP8)


@pytest.mark.parametrize("power_of_two", [True, False])
def test_blockwise_mlp_equals_its_three_gemms_and_swiglu_bit_for_bit(power_of_two):
    """The fused MLP block (`blockwise_mlp`: SwiGLU's output and input gradients exist only
    as FP8 operands) is the same arithmetic as gate/up, `swiglu`, then down through
    `blockwise_dots`: output, dx and all three wgrads equal bit for bit."""
    from infir2_jax.fp8.dots import Fp8Spec, blockwise_dots, blockwise_mlp
    from infir2_jax.fp8.quantize import E4M3
    from infir2_jax.kernels.swiglu import swiglu

    spec = Fp8Spec(E4M3, E4M3, power_of_two=power_of_two, kernel="emulated")
    rng = np.random.default_rng(2)
    t, d, f = 200, 128, 384  # 200 tokens: a partial 128-token tile
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
    ws = tuple(
        jnp.asarray(rng.normal(size=shape) * 0.05, jnp.bfloat16)
        for shape in ((d, f), (d, f), (f, d))
    )
    cotangent = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)

    def three_gemms(x, ws):
        gate, up = blockwise_dots(x, ws[:2], spec)
        return blockwise_dots(swiglu(gate, up), ws[2:], spec)[0]

    def fused(x, ws):
        return blockwise_mlp(x, ws, spec)

    def forward_and_backward(fn, x, ws, cotangent):
        y, vjp = jax.vjp(fn, x, ws)
        return [y, *jax.tree.leaves(vjp(cotangent))]

    # Both passes in one program, as a training step runs them. (Returned from a jit of the
    # forward pass alone, `blockwise_dots`' residuals come back with wrong exact scales from
    # XLA:CPU 0.10.2: a miscompile that depends on which outputs the program has.)
    results = [
        jax.jit(partial(forward_and_backward, fn))(x, ws, cotangent) for fn in (three_gemms, fused)
    ]
    assert len(results[1]) == 5
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.abs(np.asarray(results[1][0], np.float32)).max() > 0


def test_the_blockwise_recipe_runs_the_mlp_as_one_block():
    """Under `blockwise` the MLP is one `blockwise_mlp` call (SwiGLU's BF16 output and input
    gradients never exist); other recipes keep three projections and SwiGLU (silu's logistic)
    between them."""
    cfg = preset("tiny").replace(num_layers=1)
    ids = jnp.zeros((1, 128), jnp.int32)

    def jaxpr(recipe: str) -> str:
        model = Qwen2(cfg, rngs=nnx.Rngs(0), plan=resolve_plan(cfg, gemm=make_gemm(
            FP8Config(recipe=recipe))))  # fmt: skip
        return str(jax.make_jaxpr(lambda i: model(i))(ids))

    assert "_blockwise_mlp" in jaxpr("blockwise")
    assert "_blockwise_mlp" not in jaxpr("current") and "logistic" in jaxpr("current")


def _saved(f, *args) -> list[str]:
    """What jax.checkpoint keeps of f for its backward pass: each value's type and kind."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    return [line.split(" from ")[0] for line in out.getvalue().splitlines()]  # not where


@pytest.mark.parametrize(
    "policy,without_scales",
    [
        ("full", jax.checkpoint_policies.nothing_saveable),
        ("dots", jax.checkpoint_policies.checkpoint_dots),
        ("dots_no_batch", jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    ],
)
def test_remat_keeps_the_per_tensor_scales_not_their_amaxes(policy, without_scales):
    """Under remat the recomputed forward pass reuses the FP8 scales (scalars, one per tensor)
    instead of reading x and w again for their amaxes; nothing else extra is kept."""
    from infir2_jax.model.transformer import _REMAT_POLICIES

    gemm = make_gemm(FP8Config(recipe="current"))
    x = jnp.ones((64, 32), jnp.float32)
    w = jnp.ones((32, 16), jnp.float32)

    def saved(policy):
        return _saved(jax.checkpoint(lambda x, w: jnp.sum(gemm(x, w) ** 2), policy=policy), x, w)

    kept = saved(_REMAT_POLICIES[policy])
    assert sorted(line.split()[0] for line in kept if "fp8_scale" in line) == ["f32[]"] * 2, kept
    assert [line for line in kept if "fp8_scale" not in line] == saved(without_scales)
    bf16 = jax.checkpoint(lambda x, w: jnp.sum(jnp.dot(x, w) ** 2), policy=_REMAT_POLICIES[policy])
    plain = jax.checkpoint(lambda x, w: jnp.sum(jnp.dot(x, w) ** 2), policy=without_scales)
    assert _saved(bf16, x, w) == _saved(plain, x, w)  # BF16 has no scales to keep
