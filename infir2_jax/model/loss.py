"""Chunked cross-entropy: never materialises [tokens, vocab] FP32 logits for the whole batch.

Tokens are processed `chunk_size` at a time inside a `lax.scan`; each chunk's body is
rematerialised, so the backward pass recomputes that chunk's logits instead of storing them.
Peak logit memory is chunk_size × vocab × 4 bytes (2048 × 152k ≈ 1.2 GiB) instead of
batch × seq × vocab × 4 (a 32k sequence: 20 GiB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(
    hidden: jax.Array,
    unembed: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of tokens it covers.

    hidden: [batch, seq, embed] (final-normed); unembed: [embed, vocab]; labels: [batch, seq]
    integer targets; loss_mask: [batch, seq], 1 where a token counts. Returns FP32 scalars
    (sum of -log p(label) over masked-in tokens, number of masked-in tokens); the mean is their
    ratio, which callers take after summing over micro-batches and devices.
    """
    embed = hidden.shape[-1]
    h = hidden.reshape(-1, embed)
    y = labels.reshape(-1).astype(jnp.int32)
    m = loss_mask.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad))
        m = jnp.pad(m, (0, pad))
    chunks = (n + pad) // chunk
    w = unembed.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_loss(h_c: jax.Array, y_c: jax.Array, m_c: jax.Array) -> jax.Array:
        logits = jnp.dot(h_c, w, preferred_element_type=jnp.float32)  # [chunk, vocab]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return jnp.sum((log_z - target) * m_c)

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + chunk_loss(*xs), None

    xs = (h.reshape(chunks, chunk, embed), y.reshape(chunks, chunk), m.reshape(chunks, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(m)
