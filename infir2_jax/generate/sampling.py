"""Sampling parameters and the token sampler: temperature, top-k, top-p, min-p.

The order is SGLang's and vLLM's: logits / temperature, then top-k, then top-p on the
renormalised top-k distribution, then min-p (relative to the most likely token), then a
categorical draw among the tokens left. Temperature 0 is greedy (argmax).

The returned log-probability of a sampled token is of the distribution **before truncation**:
log_softmax(logits / temperature) over the whole vocabulary (temperature 1 when greedy). That
is what an RL trainer recomputes from its own forward pass, so importance weights compare like
with like; top-k/top-p/min-p only decide which tokens may be drawn.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `stop_token_ids` None: the tokenizer's defaults (EOS and
    `<|im_end|>`, see generate/engine.py); `stop`: strings that end a sample (checked on the
    decoded text); `seed`: the same seed and inputs give the same outputs."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (
                self.temperature == 0 or self.temperature >= 1e-3,
                f"temperature must be 0 (greedy) or >= 1e-3, got {self.temperature}",
            ),
            (0 <= self.seed < 2**31, f"seed must be in [0, 2**31), got {self.seed}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0: off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"sampling: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def token_filter(self) -> TokenFilter:
        """The part that shapes the compiled sampler (lengths, seeds and stops do not)."""
        return TokenFilter(self.temperature, self.top_k, self.top_p, self.min_p)


@dataclasses.dataclass(frozen=True)
class TokenFilter:
    temperature: float
    top_k: int
    top_p: float
    min_p: float


def sampling_logprobs(logits: jax.Array, temperature: float) -> jax.Array:
    """log_softmax(logits / temperature) in FP32 (temperature 0, greedy: of the logits)."""
    scale = temperature if temperature > 0 else 1.0
    return jax.nn.log_softmax(logits.astype(jnp.float32) / scale, axis=-1)


def _truncate(scaled: jax.Array, top_p: float, min_p: float) -> jax.Array:
    """-inf outside the top-p nucleus and below min_p × the largest probability, on scaled
    logits [..., k] sorted in descending order."""
    probs = jax.nn.softmax(scaled, axis=-1)
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before
        # it is below top_p (the most likely token always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        scaled = jnp.where(before < top_p, scaled, -jnp.inf)
        probs = jax.nn.softmax(scaled, axis=-1)
    if min_p > 0.0:
        scaled = jnp.where(probs >= min_p * probs[..., :1], scaled, -jnp.inf)
    return scaled


def sample(logits: jax.Array, keys: jax.Array, how: TokenFilter) -> tuple[jax.Array, jax.Array]:
    """One token per row of FP32 `logits` [rows, vocab] with one PRNG key per row
    [rows, ...]; returns (tokens [rows] int32, their log-probabilities [rows], see the module
    docstring)."""
    logprobs = sampling_logprobs(logits, how.temperature)
    if how.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        scaled = logits.astype(jnp.float32) / how.temperature
        vocab = scaled.shape[-1]
        truncating = how.top_p < 1.0 or how.min_p > 0.0
        if how.top_k and how.top_k < vocab or truncating:
            # Candidates sorted by probability: the top k, or the whole vocabulary.
            k = how.top_k if how.top_k and how.top_k < vocab else vocab
            values, indices = jax.lax.top_k(scaled, k)
            values = _truncate(values, how.top_p, how.min_p)
            draw = jax.vmap(jax.random.categorical)(keys, values)
            tokens = jnp.take_along_axis(indices, draw[:, None], axis=-1)[:, 0]
        else:
            tokens = jax.vmap(jax.random.categorical)(keys, scaled)
        tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class PerRow:
    """The static half of per-row sampling (`sample_rows`): whether any row truncates
    (top-k, top-p or min-p; a full sort of the vocabulary per row), and whether any row
    samples at all (all greedy: no random draws)."""

    truncate: bool
    draws: bool = True


@struct.dataclass
class RowFilters:
    """Sampling settings per row (a server's slots each serve their own request)."""

    temperature: jax.Array  # [rows] float32 (0: greedy)
    top_k: jax.Array  # [rows] int32 (0: off)
    top_p: jax.Array  # [rows] float32
    min_p: jax.Array  # [rows] float32

    @classmethod
    def of(cls, filters: list[TokenFilter]) -> RowFilters:
        def column(name, dtype):
            return np.array([getattr(f, name) for f in filters], dtype)

        return cls(
            column("temperature", np.float32), column("top_k", np.int32),
            column("top_p", np.float32), column("min_p", np.float32),
        )  # fmt: skip


def _thresholds(scaled: jax.Array, f: RowFilters) -> jax.Array:
    """Per row, the smallest scaled logit that top-k, then top-p, then min-p keep."""
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [rows, vocab]
    k = jnp.where((f.top_k > 0) & (f.top_k < vocab), f.top_k, vocab)
    in_k = jnp.arange(vocab)[None, :] < k[:, None]
    desc = jnp.where(in_k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((f.top_p[:, None] >= 1.0) | (before < f.top_p[:, None]))
    keep &= probs >= f.min_p[:, None] * probs[:, :1]
    count = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    return jnp.take_along_axis(desc, (count - 1)[:, None], axis=-1)[:, 0]


def sample_rows(
    logits: jax.Array, keys: jax.Array, f: RowFilters, how: PerRow
) -> tuple[jax.Array, jax.Array]:
    """`sample` with settings per row: the same order of filters, applied as a mask in
    vocabulary order, so a row's draw depends only on its key, logits and settings (not on
    its neighbours'). Returns (tokens [rows] int32, log-probabilities [rows])."""
    logits = logits.astype(jnp.float32)
    greedy = f.temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, f.temperature)[:, None]
    logprobs = jax.nn.log_softmax(scaled, axis=-1)
    tokens = jnp.argmax(logits, axis=-1)
    if how.draws:
        if how.truncate:
            scaled = jnp.where(scaled >= _thresholds(scaled, f)[:, None], scaled, -jnp.inf)
        tokens = jnp.where(greedy, tokens, jax.vmap(jax.random.categorical)(keys, scaled))
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def draw(logits, keys, how: TokenFilter | PerRow, filters: RowFilters | None):
    """`sample` with one filter for every row, or `sample_rows` with `filters` per row."""
    if isinstance(how, PerRow):
        return sample_rows(logits, keys, filters, how)
    return sample(logits, keys, how)
