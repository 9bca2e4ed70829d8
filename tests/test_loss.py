"""Chunked cross-entropy equals the plain full-logits cross-entropy, values and gradients."""

from __future__ import annotations

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
