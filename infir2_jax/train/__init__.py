"""Training: state and step, optimizer, checkpoints, metrics, the run loop."""

from infir2_jax._lazy import lazy_exports

__all__ = ["Runner", "Steps", "TrainState", "init_state", "make_train_step", "train"]
# Imported on first use: `python -m infir2_jax.train --help` loads no JAX.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "train": "infir2_jax.train.loop",
        "Runner": "infir2_jax.train.runner",
        "Steps": "infir2_jax.train.runner",
        "TrainState": "infir2_jax.train.state",
        "init_state": "infir2_jax.train.state",
        "make_train_step": "infir2_jax.train.state",
    },
)
