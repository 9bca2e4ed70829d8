"""AdamW + global-norm clipping + warmup/stable/decay schedule, all from optax."""

from __future__ import annotations

from typing import Any

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


# The settings that shape the learning-rate schedule; checkpoints record them so that a
# resume under other values can say what the learning rate does now.
SCHEDULE_FIELDS = (
    "lr", "min_lr", "warmup_steps", "warmup_fraction", "decay_start", "decay_steps", "decay_style",
)  # fmt: skip


def schedule_settings(cfg: OptimConfig, total_steps: int) -> dict[str, Any]:
    return {"train.steps": total_steps, **{f"optim.{k}": getattr(cfg, k) for k in SCHEDULE_FIELDS}}


def schedule_from_settings(settings: dict[str, Any]) -> optax.Schedule:
    """The schedule that `schedule_settings` described (e.g. one a checkpoint recorded)."""
    optim = {k.removeprefix("optim."): v for k, v in settings.items() if k.startswith("optim.")}
    return learning_rate_schedule(OptimConfig(**optim), settings["train.steps"])


def schedule_change(saved: dict[str, Any] | None, current: dict[str, Any], step: int):
    """A sentence on what the learning rate does when a run saved under the schedule settings
    `saved` continues after `step` under `current`; None if nothing changed or nothing was
    saved. The new schedule is followed as configured (not stretched to resume from the old
    rate): that is what a decay run or a longer run asks for, so the sentence gives both."""
    if saved is None:
        return None
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
    if not changed:
        return None
    new_lr = float(schedule_from_settings(current)(step))
    try:
        old = f"; the checkpoint's would give {float(schedule_from_settings(saved)(step)):.2e}"
    except (KeyError, TypeError, ValueError):  # recorded by a version with other fields
        old = ""
    return (
        f"the LR schedule differs from the checkpoint's ({', '.join(changed)}): this config's "
        f"schedule applies from step {step + 1} on, LR {new_lr:.2e}{old}"
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
