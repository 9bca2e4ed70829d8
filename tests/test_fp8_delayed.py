"""Delayed scaling over several steps against a hand recomputation (numpy + ml_dtypes),
with a layer applied twice and gradient accumulation; and the state in the real train step."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from conftest import train_interrupted
from flax import nnx

from infir2_jax.config import FP8Config, load_config
from infir2_jax.fp8 import Fp8History, Fp8Probe, make_gemm
from infir2_jax.model.layers import Linear
from infir2_jax.target import Target
from infir2_jax.train import train
from infir2_jax.train.state import update_fp8_state

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
HISTORY, LR, STEPS = 4, 0.05, 6


def _q(a: np.ndarray, scale: np.float32, fmax: float, dtype) -> np.ndarray:
    """Quantize-dequantize as FP8 arithmetic sees it: the FP8 value (as f32) times nothing."""
    return np.clip(a / scale, -fmax, fmax).astype(dtype).astype(np.float32)


def _scale(history_row: np.ndarray, fmax: float) -> np.float32:
    amax = np.float32(history_row.max())
    return np.float32(amax / np.float32(fmax)) if amax > 0 else np.float32(1.0)


def _reference_step(w, history, micro_batches):
    """One optimizer step of y = L(L(x)), loss = sum(y * r), by hand."""
    sx, sw, sg = (
        _scale(history[0], E4M3_MAX),
        _scale(history[1], E4M3_MAX),
        _scale(history[2], E5M2_MAX),
    )
    e4, e5 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
    qw = _q(w, sw, E4M3_MAX, e4)
    grad = np.zeros_like(w)
    observed = np.zeros(3, np.float32)
    for x, r in micro_batches:
        qx = _q(x, sx, E4M3_MAX, e4)
        y1 = (qx @ qw) * (sx * sw)
        qy1 = _q(y1, sx, E4M3_MAX, e4)
        g2 = r  # d loss / d y2
        qg2 = _q(g2, sg, E5M2_MAX, e5)
        g1 = (qg2 @ qw.T) * (sg * sw)  # dgrad of the second application
        qg1 = _q(g1, sg, E5M2_MAX, e5)
        grad += (qy1.T @ qg2) * (sx * sg) + (qx.T @ qg1) * (sx * sg)
        # Both applications and both micro-batches are combined by max, never summed.
        seen = [max(abs(x).max(), abs(y1).max()), abs(w).max(), max(abs(g1).max(), abs(g2).max())]
        observed = np.maximum(observed, np.asarray(seen, np.float32))
    history = np.roll(history, 1, axis=-1)
    history[:, 0] = observed
    return w - LR * grad, history


def test_delayed_scaling_matches_hand_recomputation():
    d, tokens = 24, 10
    gemm = make_gemm(FP8Config(recipe="delayed", amax_history=HISTORY, max_uses=2))

    class Twice(nnx.Module):
        def __init__(self):
            self.lin = Linear(d, d, axes=("embed", "mlp"), init_std=0.3, dtype=jnp.float32,
                              param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                              gemm=gemm.for_execution(Target(), None))  # fmt: skip

        def __call__(self, x):
            return self.lin(self.lin(x))

    graphdef, params, history, probes = nnx.split(Twice(), nnx.Param, Fp8History, Fp8Probe)
    params, history, probes = (nnx.to_pure_dict(s) for s in (params, history, probes))

    def loss(p, pr, hist, x, r):
        return jnp.sum(nnx.merge(graphdef, p, hist, pr)(x) * r)

    @jax.jit
    def step(p, hist, batches):
        grads = jax.tree.map(jnp.zeros_like, p)
        observed = jax.tree.map(jnp.zeros_like, probes)
        for x, r in batches:  # gradient accumulation over micro-batches
            g, o = jax.grad(loss, (0, 1))(p, probes, hist, x, r)
            grads = jax.tree.map(jnp.add, grads, g)
            observed = jax.tree.map(jnp.maximum, observed, o)
        p = jax.tree.map(lambda a, b: a - LR * b, p, grads)
        return p, update_fp8_state(gemm, hist, observed)

    w_ref = np.asarray(params["lin"]["kernel"])
    h_ref = np.zeros((3, HISTORY), np.float32)
    rng = np.random.default_rng(0)
    for t in range(STEPS):
        batches = [
            (rng.normal(size=(tokens, d)).astype(np.float32) * (1 + t),
             rng.normal(size=(tokens, d)).astype(np.float32) * 0.1)
            for _ in range(2)
        ]  # fmt: skip
        params, history = step(params, history, batches)
        w_ref, h_ref = _reference_step(w_ref, h_ref, batches)
        np.testing.assert_allclose(
            history["lin"]["fp8_history"], h_ref, rtol=1e-5, err_msg=f"step {t}"
        )
        np.testing.assert_allclose(params["lin"]["kernel"], w_ref, rtol=1e-4, atol=1e-6)
    # After more steps than the history holds, the oldest entries have rolled out.
    assert h_ref[:, -1].min() > 0 and not np.allclose(h_ref[:, 0], h_ref[:, -1])


def test_train_step_updates_histories_once_per_step_and_resumes(tmp_path):
    overrides = [
        "train.steps=3", "train.batch_size=4", "train.seq_len=32", "train.micro_batches=2",
        "fp8.recipe=delayed", "fp8.amax_history=5", "checkpoint.every=2",
        "data.synthetic_documents=500", f"train.run_dir={tmp_path / 'a'}",
    ]  # fmt: skip
    cfg = load_config("tiny_cpt", overrides)
    history_a = train(cfg, out=io.StringIO())

    with ocp.StandardCheckpointer() as checkpointer:  # the FP8 state is in the checkpoint
        fp8 = checkpointer.restore(tmp_path / "a" / "checkpoints" / "3" / "fp8_state")
    q_hist = np.asarray(fp8["layers"]["self_attn"]["q_proj"]["fp8_history"])  # [L, 3, 5]
    assert q_hist.shape == (cfg.model.num_layers, 3, 5)
    assert (q_hist[:, :, :3] > 0).all() and (q_hist[:, :, 3:] == 0).all()  # 3 steps, 3 columns
    # Column 0 (newest) of w is the amax of the weights before the last update.
    assert np.all(q_hist[:, 1, 0] > 0)

    # A resumed delayed run (state restored from the step-2 checkpoint) reproduces step 3.
    # (All 3 steps are inside the 30-step warmup, so train.steps=2 vs 3 leaves the LR equal.)
    resumed = train_interrupted("tiny_cpt", overrides[:-1], tmp_path / "b", stop_at=2)
    assert resumed[-1]["step"] == 3
    np.testing.assert_allclose(resumed[-1]["loss"], history_a[-1]["loss"], rtol=1e-6)
