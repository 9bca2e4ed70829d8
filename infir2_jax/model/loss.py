"""Chunked cross-entropy: never materialises [tokens, vocab] FP32 logits for the whole batch.

About `chunk_size` of a device's tokens are processed at a time inside a `lax.scan`; the
backward pass is a scan of its own that recomputes each chunk's logits instead of storing them.
Peak logit memory per device is chunk_size × vocab × 4 bytes (2048 × 152k ≈ 1.2 GiB) instead
of its tokens × vocab × 4 (a 32k sequence: 20 GiB).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from infir2_jax.parallel.rules import constrain, split_count


def _chunk_count(rows: int, positions: int, chunk_size: int, seq: int) -> int:
    """Chunks per row: the fewest that keep ≤ chunk_size of a device's tokens (`rows` ×
    `positions` of each) per chunk, rounded up to a divisor of the sequence length (rows split
    evenly, no padding)."""
    count = min(seq, max(1, -(-rows * positions // chunk_size)))  # ≥ 1 position of each row
    while seq % count:
        count += 1
    return count


def _logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """FP32 logits [b, t, v] of h [b, t, e] and w [e, v] (both in the compute dtype)."""
    return jnp.einsum("bte,ev->btv", h, w, preferred_element_type=jnp.float32)


# Inside the loss the unembedding is whole over FSDP (gathered once per loss call) and split
# over the vocabulary by tensor parallelism (each rank computes its vocabulary shard's logits).
_GATHERED = (None, "act_vocab")
# The weight gradient's FP32 accumulator: one partial sum per device holding a part of the
# tokens (batch × sequence shards, the two leading axes), so no chunk reduces it across
# devices; the partial sums are added once, after the last chunk.
_PARTIAL = ("batch", "inner_seq", None, "act_vocab")


def _by_token_shard(x: jax.Array, shards: tuple[int, int]) -> jax.Array:
    """[b, t, ...] -> [batch shards, sequence shards, b/.., t/.., ...], the two leading axes
    on the devices that hold those tokens."""
    (sb, sc), (b, t) = shards, x.shape[:2]
    x = x.reshape(sb, b // sb, sc, t // sc, *x.shape[2:]).swapaxes(1, 2)
    return constrain(x, ("batch", "inner_seq", *(None,) * (x.ndim - 2)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _over_chunks(head, w, hs, ys, shards):
    """head(logits of chunk c, y_c) for every chunk c: the leading axis of hs [C, b, t, e]
    and ys [C, b, t]."""
    return _over_chunks_fwd(head, w, hs, ys, shards)[0]


def _over_chunks_fwd(head, w, hs, ys, shards):
    def body(_, xs):
        h_c, y_c = xs
        return None, head(_logits(h_c, w), y_c)

    return jax.lax.scan(body, None, (hs, ys))[1], (w, hs, ys)


def _over_chunks_bwd(head, shards, residuals, cotangents):
    # Each chunk's logits are recomputed (nothing of them was saved). The FP32 logit gradient
    # is rounded to the compute dtype before both backward GEMMs, so they run on BF16 operands
    # with FP32 accumulation (as Megatron does) instead of as FP32 GEMMs over [tokens, vocab]
    # — on Hopper an order of magnitude slower. The weight gradient is summed in FP32, per
    # batch shard, in the gathered layout: reduced across devices once, not per chunk.
    w, hs, ys = residuals

    def body(dw, xs):
        h_c, y_c, cot = xs
        _, head_vjp = jax.vjp(lambda logits: head(logits, y_c), _logits(h_c, w))
        g = head_vjp(cot)[0].astype(h_c.dtype)
        dh = jnp.einsum("btv,ev->bte", g, w, preferred_element_type=jnp.float32)
        dw_c = jnp.einsum(
            "scbte,scbtv->scev",
            _by_token_shard(h_c, shards),
            _by_token_shard(g, shards),
            preferred_element_type=jnp.float32,
        )
        return constrain(dw + dw_c, _PARTIAL), dh.astype(h_c.dtype)

    zeros = constrain(jnp.zeros((*shards, *w.shape), jnp.float32), _PARTIAL)
    dw, dhs = jax.lax.scan(body, zeros, (hs, ys, cotangents))
    return constrain(dw.sum(axis=(0, 1)), _GATHERED).astype(w.dtype), dhs, None


_over_chunks.defvjp(_over_chunks_fwd, _over_chunks_bwd)


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
    The backward pass recomputes each chunk's logits. The unembedding is gathered over FSDP
    once, before the chunks, and its gradient summed over them in FP32 and reduced once.
    """
    batch, seq, embed = hidden.shape
    # chunk_size counts one device's tokens: the rows and positions it holds.
    rows = math.gcd(split_count("batch"), batch)
    positions = math.gcd(split_count("inner_seq"), seq)
    count = _chunk_count(batch // rows, seq // positions, chunk_size, seq)
    shards = (rows, math.gcd(positions, seq // count))
    # Cast where the weight is still sharded, so the gather moves compute-dtype bytes.
    w = constrain(constrain(unembed.astype(hidden.dtype), ("embed", "vocab")), _GATHERED)
    vocab_ids = jnp.arange(w.shape[1], dtype=jnp.int32)

    def head(logits: jax.Array, y_c: jax.Array) -> tuple[jax.Array, jax.Array | None]:
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

    def strided(x: jax.Array) -> jax.Array:  # [batch, seq, ...] -> [count, batch, seq/count, ...]
        x = jnp.moveaxis(x.reshape(batch, seq // count, count, *x.shape[2:]), 2, 0)
        return constrain(x, (None, "batch", "inner_seq", *(None,) * (x.ndim - 3)))

    def unstrided(x: jax.Array) -> jax.Array:  # the inverse, for [count, batch, seq/count]
        return jnp.moveaxis(x, 0, 2).reshape(batch, seq)

    logprobs, entropy = _over_chunks(
        head, w, strided(hidden), strided(targets.astype(jnp.int32)), shards
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
