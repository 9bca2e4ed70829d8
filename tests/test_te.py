"""TransformerEngine-JAX recipes (`te_current`, `te_delayed`).

Without a GPU, TE runs here through its compile-only setup (`infir2_jax.fp8.te_deviceless`:
a stub CUDA driver and a compute-capability answer) and, on the CPU, through TE's own pure-JAX
implementation of its recipes — so the wiring (state, probes, checkpoints, sharding) and TE's
numerics are tested here, and TE's GPU kernels are checked by compiling the real step for an
H100. Skipped, with the reason, when TE is not installed (`bash launch/install_te_jax.sh`;
CI installs it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, plan_h100, train_interrupted
from flax import nnx

from infir2_jax.compat import cuda_plugin
from infir2_jax.config import FP8Config, load_config
from infir2_jax.fp8 import Fp8Probe, Fp8State, make_gemm
from infir2_jax.fp8.te import te_installed
from infir2_jax.model.layers import Linear
from infir2_jax.target import local_target
from infir2_jax.train.loop import train
from infir2_jax.train.state import update_fp8_state

HAS_TE = te_installed()
needs_te = pytest.mark.skipif(
    not HAS_TE, reason="TransformerEngine-JAX not installed (bash launch/install_te_jax.sh)"
)
HAS_PLUGIN = cuda_plugin() is not None
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


@pytest.fixture(scope="module")
def te():
    from infir2_jax.fp8 import te_deviceless

    te_deviceless.enable()


def test_te_implementation_is_chosen_once_from_the_target(monkeypatch):
    """TE's switch (NVTE_JAX_CUSTOM_CALLS, read by TE while tracing) is set when the plan is
    resolved, never while tracing: off for a CPU target; for a CUDA target the user's own
    value comes back (none: TE's default, its kernels)."""
    from infir2_jax.fp8.te import TeGemm
    from infir2_jax.target import Target

    h100 = Target("cuda", (9, 0), "h100")
    for user in (None, "te_gemm=false"):
        if user is None:
            monkeypatch.delenv("NVTE_JAX_CUSTOM_CALLS", raising=False)
        else:
            monkeypatch.setenv("NVTE_JAX_CUSTOM_CALLS", user)
        gemm = TeGemm("te_current").for_execution(Target(), None)
        assert os.environ["NVTE_JAX_CUSTOM_CALLS"] == "false" and gemm.layout is None
        TeGemm("te_current").for_execution(Target(), None)  # twice: the user's value is kept
        TeGemm("te_current").for_execution(h100, None)
        assert os.environ.get("NVTE_JAX_CUSTOM_CALLS") == user


@pytest.mark.parametrize("recipe", ["te_delayed", "te_current"])
def test_missing_transformer_engine_names_the_install_script(recipe, monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: (
            real(name + "-absent") if name.startswith("transformer_engine") else real(name)
        ),
    )
    with pytest.raises(ValueError, match=rf"fp8.recipe={recipe}: .*install_te_jax.sh"):
        make_gemm(FP8Config(recipe=recipe))


@needs_te
def test_te_delayed_refuses_a_one_entry_history(te):
    with pytest.raises(ValueError, match="fp8.amax_history"):
        make_gemm(FP8Config(recipe="te_delayed", amax_history=1))


@needs_te
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_te_current_equals_our_current_scaling(te, dtype):
    """NVIDIA's implementation of per-tensor current scaling (E4M3 forward, E5M2 gradients)
    and ours agree to float32 rounding (the same quantized operands and scales; only the
    order of the final rescale differs), a thousand times closer than either is to the exact
    product."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, 128)), dtype)
    w = jnp.asarray(rng.normal(size=(128, 192)) * 0.05, dtype)
    c = jnp.asarray(rng.normal(size=(256, 192)), dtype)

    def value_and_grads(recipe):
        gemm = make_gemm(FP8Config(recipe=recipe)).for_execution(local_target(), None)
        loss = lambda x, w: jnp.sum((gemm(x, w) * c).astype(jnp.float32))  # noqa: E731
        return [np.asarray(a, np.float32) for a in jax.tree.leaves(
            jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w))]  # fmt: skip

    ours, theirs, exact = (value_and_grads(r) for r in ("current", "te_current", "none"))
    for a, b, e in zip(ours, theirs, exact, strict=True):
        rel = lambda u, v: np.linalg.norm(u - v) / np.linalg.norm(v)  # noqa: E731
        assert rel(b, a) < 2e-5, rel(b, a)
        assert rel(b, e) > 1e-3 and rel(b, a) < rel(b, e) / 1000, (rel(b, a), rel(b, e))


def _te_update(history, scale, amax, fp8_max):
    """TE's DelayedScaleQuantizer.update, by hand: the newest amax enters slot 0, the scale
    comes from the history's max (kept when that is 0), then the history rolls left and slot 0
    is cleared."""
    history = history.copy()
    history[0] = amax
    top = history.max()
    if top > 0 and np.isfinite(top):
        scale = np.float32(fp8_max) / np.float32(top)
    history = np.roll(history, -1)
    history[0] = 0.0
    return history, np.float32(scale)


@needs_te
def test_te_delayed_state_follows_te_update_and_scales_the_next_step(te):
    """A layer trained on 2 micro-batches per step: after every step its state is TE's update
    with the step's amaxes (max over micro-batches), and the next forward quantizes x and w
    with the new scales."""
    d_in, d_out, tokens, history_len = 32, 48, 16, 4
    gemm = make_gemm(FP8Config(recipe="te_delayed", amax_history=history_len))
    lin = Linear(d_in, d_out, axes=("embed", "mlp"), init_std=0.3, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                 gemm=gemm.for_execution(local_target(), None))  # fmt: skip
    graphdef, params, fp8, probes = nnx.split(lin, nnx.Param, Fp8State, Fp8Probe)
    params, fp8, probes = (nnx.to_pure_dict(s) for s in (params, fp8, probes))
    assert set(fp8) == {"fp8_history", "fp8_scale"}

    def loss(p, pr, state, x, r):
        return jnp.sum(nnx.merge(graphdef, p, state, pr)(x) * r)

    @jax.jit
    def step(p, state, batches):
        observed = jax.tree.map(jnp.zeros_like, probes)
        for x, r in batches:
            _, o = jax.grad(loss, (0, 1))(p, probes, state, x, r)
            observed = jax.tree.map(jnp.maximum, observed, o)
        return update_fp8_state(gemm, {"lin": state}, {"lin": observed})["lin"]

    w = np.asarray(params["kernel"])
    h_ref = np.zeros((3, history_len), np.float32)
    s_ref = np.ones(3, np.float32)
    rng = np.random.default_rng(0)
    for t in range(6):  # more steps than the history holds
        batches = [
            (rng.normal(size=(tokens, d_in)).astype(np.float32) * (1 + t),
             rng.normal(size=(tokens, d_out)).astype(np.float32) * 0.1 * (1 + i))
            for i in range(2)
        ]  # fmt: skip
        fp8 = step(params, fp8, batches)
        amax = [
            max(np.abs(x).max() for x, _ in batches),
            np.abs(w).max(),
            max(np.abs(r).max() for _, r in batches),  # g = d(sum(y * r))/dy = r
        ]
        for row, fp8_max in enumerate((E4M3_MAX, E4M3_MAX, E5M2_MAX)):
            h_ref[row], s_ref[row] = _te_update(h_ref[row], s_ref[row], amax[row], fp8_max)
        np.testing.assert_allclose(fp8["fp8_history"], h_ref, rtol=1e-6, err_msg=f"step {t}")
        np.testing.assert_allclose(fp8["fp8_scale"], s_ref, rtol=1e-6, err_msg=f"step {t}")

    # The forward pass quantizes with the stored scales (TE: q = cast(v · scale), and the
    # product is rescaled by 1 / (scale_x · scale_w)).
    x = batches[0][0]
    y = nnx.merge(graphdef, params, fp8, probes)(jnp.asarray(x))
    sx, sw = np.float32(s_ref[0]), np.float32(s_ref[1])

    def q(v, s):
        return np.clip(v * s, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)

    expected = (q(x, sx).astype(np.float32) @ q(w, sw).astype(np.float32)) / (sx * sw)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


@needs_te
def test_te_delayed_training_checkpoints_its_state_and_resumes_exactly(te, tmp_path):
    overrides = [
        "train.steps=3", "train.batch_size=4", "train.seq_len=32", "train.micro_batches=2",
        "fp8.recipe=te_delayed", "fp8.amax_history=5", "checkpoint.every=2",
        "data.synthetic_documents=500", f"train.run_dir={tmp_path / 'a'}",
    ]  # fmt: skip
    cfg = load_config("tiny_cpt", overrides)
    history_a = train(cfg, out=io.StringIO())
    with ocp.StandardCheckpointer() as checkpointer:
        fp8 = checkpointer.restore(tmp_path / "a" / "checkpoints" / "3" / "fp8_state")
    q_proj = fp8["layers"]["self_attn"]["q_proj"]
    assert q_proj["fp8_history"].shape == (cfg.model.num_layers, 3, 5)
    assert q_proj["fp8_scale"].shape == (cfg.model.num_layers, 3)
    # Three updates: the newest three amaxes sit at the end (TE rolls left), slot 0 cleared.
    assert (q_proj["fp8_history"][..., 2:] > 0).all() and (
        q_proj["fp8_history"][..., :2] == 0
    ).all()
    assert (q_proj["fp8_scale"] != 1).all()

    resumed = train_interrupted("tiny_cpt", overrides[:-1], tmp_path / "b", stop_at=2)
    assert resumed[-1]["step"] == 3
    np.testing.assert_allclose(resumed[-1]["loss"], history_a[-1]["loss"], rtol=1e-6)
    # TE's recipe trains like ours: the same loss curve to FP8 precision.
    delayed = [*overrides[:-1], "fp8.recipe=delayed", f"train.run_dir={tmp_path / 'c'}"]
    ours = train(load_config("tiny_cpt", delayed), out=io.StringIO())
    for a, b in zip(history_a, ours, strict=True):
        assert abs(a["loss"] - b["loss"]) < 2e-3 * b["loss"], (a, b)


@needs_te
def test_te_sharded_step_equals_single_device(tmp_path):
    """Data × TP × CP (sequence parallel) and FSDP × TP on 8 devices against one device.
    te_delayed: the scales come from global amaxes (TE all-reduces them; here the probes'
    max over devices), so the forward state matches exactly and the loss to float32 sums.
    te_current: TE scales activations and gradients per device (it reduces amaxes only over
    a sequence split), so the loss moves by FP8 rounding, not more."""
    out = tmp_path / "te_cases.json"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "te_cases.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cases = json.loads(out.read_text())["steps"]
    assert {c["recipe"] for c in cases} == {"te_current", "te_delayed"} and len(cases) == 4
    for case in cases:
        assert case["grads"] < 3 * case["grads_noise_floor"], case
        if case["recipe"] == "te_delayed":
            assert case["fp8_states"] == 14, case  # scale + history per projection
            assert case["loss"] < 1e-6, case
            assert case["forward_amax"] == 0.0 and case["forward_scale"] == 0.0, case
            # A per-device gradient amax would be off by tens of percent.
            assert case["grad_amax"] < 1e-2, case
            assert case["amax_observed"] > 0, case  # every GEMM's x, w and g reported
        else:
            assert case["fp8_states"] == 0 and case["loss"] < 1e-3, case


@needs_te
@pytest.mark.skipif(not HAS_PLUGIN, reason="CUDA plugin absent: requirements-gpu-compile.txt")
@pytest.mark.parametrize("recipe,tensor", [("te_delayed", 1), ("te_delayed", 2), ("te_current", 2)])
def test_te_recipes_compile_to_te_kernels_for_h100(recipe, tensor):
    """Every projection GEMM of both layer bodies is TE's FP8 GEMM (7 fprop; 6 recomputed
    fprop + 7 dgrad + 7 wgrad), fed by TE's quantize kernels; no FP8 or FP32 GEMM of XLA's
    own is left. Alone and under tensor parallelism 2."""
    extra = [] if tensor == 1 else ["parallel.tensor=2", "parallel.data=1", "model.vocab_size=258"]
    c = plan_h100(f"fp8.recipe={recipe}", *extra, devices=tensor)["census"]
    assert c["te_gemms"] == c["te_fp8_gemms"] == c["fp8_gemms"] == 27, c
    assert c["f32_gemms"] == 0 and c["fp8_gemms_f32_out"] == 0, c
    # te_delayed quantizes x, w and g of every GEMM with stored scales; te_current computes
    # some amaxes in the quantize kernel's fused pass. Either way, TE kernels throughout.
    assert c["te_quantize"] >= 27, c
