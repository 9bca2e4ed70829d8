"""Chunked cross-entropy: never materialises [tokens, vocab] FP32 logits for the whole batch.

About `chunk_size` tokens are processed at a time inside a `lax.scan`; each chunk's body is
rematerialised, so the backward pass recomputes that chunk's logits instead of storing them.
Peak logit memory is chunk_size × vocab × 4 bytes (2048 × 152k ≈ 1.2 GiB) instead of
batch × seq × vocab × 4 (a 32k sequence: 20 GiB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infir2_jax.parallel.rules import constrain


def _chunk_count(batch: int, seq: int, chunk_size: int) -> int:
    """Chunks per row: the fewest that keep ≤ chunk_size tokens of the batch per chunk, rounded
    up to a divisor of the sequence length (rows split evenly, no padding)."""
    count = min(seq, max(1, -(-batch * seq // chunk_size)))  # ≥ 1 position of each row
    while seq % count:
        count += 1
    return count


@jax.custom_vjp
def _logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """FP32 logits [b, t, v] of h [b, t, e] and w [e, v] (both in the compute dtype)."""
    return jnp.einsum("bte,ev->btv", h, w, preferred_element_type=jnp.float32)


def _logits_fwd(h, w):
    return _logits(h, w), (h, w)


def _logits_bwd(residuals, g):
    # The FP32 logit gradient is rounded to the compute dtype before both backward GEMMs, so
    # they run on BF16 operands with FP32 accumulation (as Megatron does) instead of as FP32
    # GEMMs over [tokens, vocab] — on Hopper an order of magnitude slower.
    h, w = residuals
    g = g.astype(h.dtype)
    dh = jnp.einsum("btv,ev->bte", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("bte,btv->ev", h, g, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype)


_logits.defvjp(_logits_fwd, _logits_bwd)


def token_logprobs(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """log p(target) at every position and, if `with_entropy`, the entropy of the predicted
    distribution, without [tokens, vocab] logits: [batch, seq] FP32 each (entropy None
    otherwise).

    hidden: [batch, seq, embed] (final-normed); unembed: [embed, vocab]; targets: [batch, seq]
    integer ids. p = softmax(logits / temperature): RL compares these with the sampler's
    log-probabilities (generate/sampling.py), which are of the same distribution.

    Chunk c holds positions c, c + C, c + 2C, ... of every row (a strided split), so the batch
    and sequence shardings (data, context) carry over into every chunk unchanged, and the
    logits of a chunk are split over the vocabulary (tensor): Megatron's vocab-parallel
    cross-entropy, with GSPMD reducing the log-sum-exp and the target logit across shards.
    Each chunk is rematerialised: the backward pass recomputes its logits.
    """
    batch, seq, embed = hidden.shape
    count = _chunk_count(batch, seq, chunk_size)
    w = unembed.astype(hidden.dtype)
    vocab_ids = jnp.arange(w.shape[1], dtype=jnp.int32)

    @jax.checkpoint
    def chunk(h_c: jax.Array, y_c: jax.Array) -> tuple[jax.Array, jax.Array]:
        h_c = constrain(h_c, ("batch", "inner_seq", None))
        logits = _logits(h_c, w)
        if temperature != 1.0:
            logits = logits / temperature
        logits = constrain(logits, ("batch", "inner_seq", "act_vocab"))
        log_z = jax.nn.logsumexp(logits, axis=-1)
        # The target logit by a masked sum, not a gather: stays local to each vocab shard.
        target = jnp.sum(jnp.where(vocab_ids == y_c[..., None], logits, 0.0), axis=-1)
        if not with_entropy:
            return target - log_z, None
        expected = jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return target - log_z, log_z - expected

    def body(carry: None, xs: tuple[jax.Array, ...]) -> tuple[None, tuple]:
        return None, chunk(*xs)

    def strided(x: jax.Array) -> jax.Array:  # [batch, seq, ...] -> [count, batch, seq/count, ...]
        return jnp.moveaxis(x.reshape(batch, seq // count, count, *x.shape[2:]), 2, 0)

    def unstrided(x: jax.Array) -> jax.Array:  # the inverse, for [count, batch, seq/count]
        return jnp.moveaxis(x, 0, 2).reshape(batch, seq)

    _, (logprobs, entropy) = jax.lax.scan(
        body, None, (strided(hidden), strided(targets.astype(jnp.int32)))
    )
    return unstrided(logprobs), None if entropy is None else unstrided(entropy)


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
    ratio, which callers take after summing over micro-batches and devices. The chunking and
    its sharding are `token_logprobs`'.
    """
    logprobs, _ = token_logprobs(hidden, unembed, labels, chunk_size=chunk_size)
    m = loss_mask.astype(jnp.float32)
    return -jnp.sum(logprobs * m), jnp.sum(m)
