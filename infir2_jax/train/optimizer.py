"""AdamW + global-norm clipping + warmup/stable/decay schedule, all from optax."""

from __future__ import annotations

import jax
import optax

from infir2_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr, constant lr until `decay_start`, decay to `min_lr`, then flat."""
    decay_start = cfg.warmup_steps if cfg.decay_start is None else cfg.decay_start
    if decay_start < cfg.warmup_steps:
        raise ValueError(
            f"optim.decay_start ({decay_start}) is before the end of warmup ({cfg.warmup_steps})"
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
            optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
            optax.constant_schedule(cfg.lr),
            decays[cfg.decay_style](),
        ],
        boundaries=[cfg.warmup_steps, decay_start],
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
