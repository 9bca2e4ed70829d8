"""The Pallas flash-attention kernel in Pallas' interpreter on the CPU, against XLA attention
with our explicit mask: packed rows (3+ documents, padding), grouped-query heads, FP32 and
BF16, forward and gradients, whole rows and the context-parallel shape (a device's two query
chunks in load-balanced order against the whole row's keys). Sharded runs (context, tensor,
data parallelism) are in tests/sharded_cases.py; the H100 compile in test_gpu_compile.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infir2_jax.kernels.flash_attention import flash_attention
from infir2_jax.model import ExecutionConfig, Qwen2, preset, resolve_plan
from infir2_jax.model.attention import attention_mask
from infir2_jax.parallel.context import load_balanced_order

B, T, HEADS, KV_HEADS, D = 2, 128, 4, 2, 32
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, HEADS, D)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(B, T, KV_HEADS, D)), dtype) for _ in range(2))
    # row 0: three documents and padding; row 1: two documents, no padding
    segments = np.zeros((B, T), np.int32)
    segments[0, :40], segments[0, 40:71], segments[0, 71:110] = 1, 2, 3
    segments[1, :90], segments[1, 90:] = 1, 2
    return q, k, v, jnp.asarray(segments)


def _reference(q, k, v, q_index, k_index, q_segments, k_segments):
    mask = attention_mask(q_index, k_index, q_segments, k_segments)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.max(np.abs(want))), 1.0)
    assert float(np.max(np.abs(got - want))) <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_whole_rows_forward_and_gradients(dtype):
    q, k, v, segments = _inputs(dtype)
    index = jnp.arange(T, dtype=jnp.int32)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), dtype)

    def flash(q, k, v):  # 32-token tiles: 4 query and 4 key blocks, causal block skipping
        return flash_attention(q, k, v, index, index, segments, segments, 32, True, True)

    def xla(q, k, v):
        return _reference(q, k, v, index, index, segments, segments)

    _close(flash(q, k, v), xla(q, k, v), dtype)
    loss = lambda f: lambda q, k, v: jnp.sum((f(q, k, v) * cot).astype(jnp.float32))  # noqa: E731
    for got, want in zip(
        jax.grad(loss(flash), (0, 1, 2))(q, k, v),
        jax.grad(loss(xla), (0, 1, 2))(q, k, v),
        strict=True,
    ):
        _close(got, want, dtype)


def test_context_parallel_shape_forward_and_gradients():
    """Queries: device 1 of 2 under load-balanced context parallelism (chunks 1 and 2 of 4,
    non-contiguous indices); keys: the whole row. No causal block skipping."""
    q, k, v, segments = _inputs(jnp.float32, seed=2)
    order = load_balanced_order(T, 2)
    mine = order[T // 2 :]  # the second device's token indices
    q_index, k_index = jnp.asarray(mine, jnp.int32), jnp.arange(T, dtype=jnp.int32)
    q_local, q_segments = q[:, mine], segments[:, mine]

    def flash(q, k, v):
        return flash_attention(q, k, v, q_index, k_index, q_segments, segments, 32, False, True)

    def xla(q, k, v):
        return _reference(q, k, v, q_index, k_index, q_segments, segments)

    _close(flash(q_local, k, v), xla(q_local, k, v), jnp.float32)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), (0, 1, 2))(q_local, k, v)
             for f in (flash, xla)]  # fmt: skip
    for got, want in zip(*grads, strict=True):
        _close(got, want, jnp.float32)


def test_model_with_pallas_attention_equals_xla_attention():
    """The tiny model end to end (FP32): attention_impl pallas = xla, packed rows."""
    cfg = preset("tiny").replace(dtype="float32", num_layers=2)
    _, _, _, segments = _inputs(jnp.float32)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, size=(B, T)))
    positions = jnp.asarray(np.concatenate([np.arange(40), np.arange(31), np.arange(57)]))
    positions = jnp.broadcast_to(positions, (B, T))

    def model(impl: str) -> Qwen2:
        execution = ExecutionConfig(attention_impl=impl, attention_block=32)
        return Qwen2(cfg, rngs=nnx.Rngs(0), plan=resolve_plan(cfg, execution))

    logits = {impl: model(impl)(ids, positions, segments) for impl in ("xla", "pallas")}
    valid = np.asarray(segments) > 0
    diff = np.abs(np.asarray(logits["pallas"]) - np.asarray(logits["xla"]))[valid]
    assert float(diff.max()) < 1e-4


def test_shapes_the_kernel_does_not_take_are_named():
    q, k, v, segments = _inputs(jnp.float32)
    index = jnp.arange(T, dtype=jnp.int32)
    with pytest.raises(ValueError, match="query length 128 must be a multiple of the tile 48"):
        flash_attention(q, k, v, index, index, segments, segments, 48, True, True)
    with pytest.raises(ValueError, match="query length 8 must be a multiple of the tile 8, a"):
        flash_attention(
            q[:, :8],
            k[:, :8],
            v[:, :8],
            index[:8],
            index[:8],
            segments[:, :8],
            segments[:, :8],
            32,
            True,
            False,
        )  # Triton: tiles of at least 16
    with pytest.raises(ValueError, match="head_dim 24 must be a power of two"):
        flash_attention(q[..., :24], k[..., :24], v[..., :24], index, index, segments,
                        segments, 32, True, True)  # fmt: skip
