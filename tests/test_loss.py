"""Chunked cross-entropy equals the plain full-logits cross-entropy, values and gradients."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infir2_jax.model import chunked_cross_entropy


def _reference(hidden, unembed, labels, mask):
    logits = jnp.einsum("bte,ev->btv", hidden, unembed)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # 7 does not divide 2*11 tokens
def test_chunked_matches_full(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 11, 24)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(24, 50)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 50, size=(2, 11)))
    mask = jnp.asarray(rng.integers(0, 2, size=(2, 11)), jnp.float32)

    total, count = chunked_cross_entropy(hidden, unembed, labels, mask, chunk_size=chunk)
    ref_total, ref_count = _reference(hidden, unembed, labels, mask)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    assert count == ref_count

    grad = jax.grad(
        lambda h, w: chunked_cross_entropy(h, w, labels, mask, chunk_size=chunk)[0], (0, 1)
    )
    ref_grad = jax.grad(lambda h, w: _reference(h, w, labels, mask)[0], (0, 1))
    for got, want in zip(grad(hidden, unembed), ref_grad(hidden, unembed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_full_logits_are_never_materialised():
    """The compiled loss+grad holds at most [chunk, vocab] logits, not [tokens, vocab]."""
    tokens, vocab, chunk = 4096, 8192, 256
    hidden = jax.ShapeDtypeStruct((1, tokens, 64), jnp.float32)
    unembed = jax.ShapeDtypeStruct((64, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, tokens), jnp.int32)

    def loss(h, w, y):
        return chunked_cross_entropy(h, w, y, jnp.ones(y.shape), chunk_size=chunk)[0]

    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(hidden, unembed, labels).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = tokens * vocab * 4
    assert temp < full_logits / 4, (temp, full_logits)


def test_bf16_backward_gemms_take_bf16_operands():
    """In BF16 the two backward GEMMs over [tokens, vocab] run on BF16 operands (the FP32 logit
    gradient rounded once), with FP32 accumulation — not as FP32 GEMMs — and the gradients stay
    within BF16 rounding of the FP32 computation."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.bfloat16)
    unembed = jnp.asarray(rng.normal(size=(32, 64)) * 0.2, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 64, size=(2, 16)))
    mask = jnp.ones((2, 16), jnp.float32)

    def loss(h, w):
        return chunked_cross_entropy(h, w, labels, mask, chunk_size=8)[0]

    text = jax.jit(jax.grad(loss, (0, 1))).lower(hidden, unembed).as_text()
    dots = re.findall(r"stablehlo.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    assert len(dots) == 3  # logits (forward, recomputed once), dh, dw
    assert all("bf16" in a and "bf16" in b for a, b in dots), dots

    got = jax.grad(loss, (0, 1))(hidden, unembed)
    f32 = jax.grad(
        lambda h, w: _reference(h, w, labels, mask)[0], (0, 1)
    )(hidden.astype(jnp.float32), unembed.astype(jnp.float32))  # fmt: skip
    for g, want in zip(got, f32, strict=True):
        assert g.dtype == jnp.bfloat16
        err = np.abs(np.asarray(g, np.float32) - np.asarray(want))
        assert err.max() <= 2e-2 * np.abs(np.asarray(want)).max(), err.max()


@pytest.mark.parametrize("chunk, temperature", [(7, 1.0), (16, 0.7), (1000, 1.3)])
def test_token_logprobs_and_entropy_match_full_logits(chunk, temperature):
    from infir2_jax.model.loss import token_logprobs

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 11, 24)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(24, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, size=(2, 11)))
    logprobs, entropy = token_logprobs(
        hidden, unembed, targets, chunk_size=chunk, temperature=temperature, with_entropy=True
    )
    logp = jax.nn.log_softmax(jnp.einsum("bte,ev->btv", hidden, unembed) / temperature, -1)
    want = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logprobs, want, atol=1e-5)
    np.testing.assert_allclose(entropy, -jnp.sum(jnp.exp(logp) * logp, -1), atol=1e-4)
    assert token_logprobs(hidden, unembed, targets, chunk_size=chunk)[1] is None
