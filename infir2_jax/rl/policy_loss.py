"""The policy loss of GRPO with DAPO's and slime's extras, per token, then aggregated.

For each response token t with trainer log-probability logp (differentiated), the log-
probability before this update old_logp, the rollout engine's rollout_logp and the sample's
advantage A:

    ratio   = exp(logp − old_logp)
    surrogate = max(−A · ratio, −A · clip(ratio, 1 − ε_low, 1 + ε_high))     (clip-higher)
    tis     = min(exp(old_logp − rollout_logp), C)     (truncated importance sampling: the
              rollout engine's distribution differs slightly from the trainer's; no gradient)
    loss_t  = tis · surrogate + β · KL_t − γ · entropy_t

KL_t to a frozen reference (ref_logp): k1 = logp − ref_logp, or k3 = exp(ref_logp − logp) −
(ref_logp − logp) − 1. InfiR2: ε 0.2 / 0.28, C = 2, β = γ = 0.

Aggregation into (loss_sum, weight), summed over micro-batches and devices, the loss being
their ratio — so any split of the batch gives the same loss:
    token_mean            Σ loss_t / number of tokens
    seq_mean_token_mean   mean over samples of (their token mean)   (slime's default)
    seq_mean_token_sum    mean over samples of (their token sum)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The loss settings are a config section (`rl.loss`), so they live with the config.
from infir2_jax.config import Aggregation, PolicyLossConfig

__all__ = ["Aggregation", "PolicyLossConfig", "policy_loss"]


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    sample_ids: jax.Array,
    num_samples: int,
    cfg: PolicyLossConfig,
    *,
    rollout_logprobs: jax.Array | None = None,
    ref_logprobs: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, weight, metrics) over packed rows. All token arrays are [batch, seq]:
    `advantages` per token (its sample's), `mask` 1 on response tokens, `sample_ids` the index
    of each token's sample in [0, num_samples) (anything where mask is 0). Metrics are sums
    over tokens (divide by the `tokens` metric), so they too add across micro-batches."""
    f32 = jnp.float32
    m = mask.astype(f32)
    logprobs, old_logprobs = logprobs.astype(f32), old_logprobs.astype(f32)
    advantages = advantages.astype(f32)
    ratio = jnp.exp(logprobs - old_logprobs)
    clipped = jnp.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    surrogate = jnp.maximum(-advantages * ratio, -advantages * clipped)
    metrics = {
        "tokens": jnp.sum(m),
        # The clip is active (the gradient of that token is zero) at the low bound for A < 0
        # and at the high bound for A > 0.
        "clip_low": jnp.sum(m * ((advantages < 0) & (ratio < 1 - cfg.clip_low))),
        "clip_high": jnp.sum(m * ((advantages > 0) & (ratio > 1 + cfg.clip_high))),
    }
    per_token = surrogate
    if cfg.tis_cap is not None and rollout_logprobs is not None:
        raw = jnp.exp(old_logprobs - rollout_logprobs.astype(f32))
        tis = jax.lax.stop_gradient(jnp.minimum(raw, cfg.tis_cap))
        per_token = tis * per_token
        metrics["tis_weight"] = jnp.sum(m * tis)
        metrics["tis_clipped"] = jnp.sum(m * (raw > cfg.tis_cap))
    if rollout_logprobs is not None:
        metrics["logprob_mismatch"] = jnp.sum(m * jnp.abs(old_logprobs - rollout_logprobs))
    if cfg.kl_coef and ref_logprobs is not None:
        diff = ref_logprobs.astype(f32) - logprobs
        kl = -diff if cfg.kl_estimator == "k1" else jnp.exp(diff) - diff - 1
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = jnp.sum(m * kl)
    if entropy is not None:
        if cfg.entropy_coef:
            per_token = per_token - cfg.entropy_coef * entropy
        metrics["entropy"] = jnp.sum(m * jax.lax.stop_gradient(entropy))
    loss_sum, weight = aggregate(per_token, m, sample_ids, num_samples, cfg.aggregation)
    return loss_sum, weight, metrics


def aggregate(
    per_token: jax.Array,
    mask: jax.Array,
    sample_ids: jax.Array,
    num_samples: int,
    how: Aggregation,
) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, weight) of per-token losses, see the module docstring. `weight` of the
    per-sample modes counts the samples with at least one token here."""
    m = mask.astype(jnp.float32)
    if how == "token_mean":
        return jnp.sum(per_token * m), jnp.sum(m)
    ids = jnp.where(m > 0, sample_ids, num_samples).reshape(-1)  # masked: a dropped bucket
    sums = jax.ops.segment_sum((per_token * m).reshape(-1), ids, num_samples + 1)[:-1]
    counts = jax.ops.segment_sum(m.reshape(-1), ids, num_samples + 1)[:-1]
    present = counts > 0
    if how == "seq_mean_token_mean":
        sums = jnp.where(present, sums / jnp.maximum(counts, 1.0), 0.0)
    elif how != "seq_mean_token_sum":
        raise ValueError(f"rl.loss.aggregation: {how!r} is not one of {Aggregation.__args__}")
    return jnp.sum(sums), jnp.sum(present.astype(jnp.float32))
