"""AdamW + global-norm clipping + warmup/stable/decay schedule, all from optax."""

from __future__ import annotations

import jax
import optax

from infir2_jax.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_fraction is None:
        return cfg.warmup_steps
    if cfg.warmup_steps:
        raise ValueError("optim.warmup_fraction and optim.warmup_steps: set one, not both")
    if not 0 <= cfg.warmup_fraction < 1:
        raise ValueError(f"optim.warmup_fraction={cfg.warmup_fraction} is not in [0, 1)")
    return round(cfg.warmup_fraction * total_steps)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr, constant lr until `decay_start`, decay to `min_lr`, then flat.

    The rate of optimizer step s (counted from 0) is schedule(s): as in Megatron, the first
    step of a warmup uses 0, and warmup ends with exactly `lr` at s = warmup. WSD is
    warmup/stable/decay with an explicit `decay_start`; "cosine with warmup fraction" is
    `warmup_fraction` with the default decay (from the end of warmup to `total_steps`).
    """
    warmup = warmup_steps(cfg, total_steps)
    decay_start = warmup if cfg.decay_start is None else cfg.decay_start
    if decay_start < warmup:
        raise ValueError(
            f"optim.decay_start ({decay_start}) is before the end of warmup ({warmup})"
        )
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps - decay_start
    decay_steps = max(decay_steps, 1)
    decays = {
        "cosine": lambda: optax.cosine_decay_schedule(
            cfg.lr, decay_steps, alpha=cfg.min_lr / cfg.lr if cfg.lr else 0.0
        ),
        "linear": lambda: optax.linear_schedule(cfg.lr, cfg.min_lr, decay_steps),
        "constant": lambda: optax.constant_schedule(cfg.lr),
    }
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
            optax.constant_schedule(cfg.lr),
            decays[cfg.decay_style](),
        ],
        boundaries=[warmup, decay_start],
    )


def _decay_mask(params: dict) -> dict:
    """Weight decay on matrices (kernels, embeddings) only, not on biases or norm scales —
    Megatron's default, which InfiR2 uses."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )
