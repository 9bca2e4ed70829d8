"""Training: state and step, optimizer, checkpoints, metrics, the run loop."""

from infir2_jax.train.loop import train
from infir2_jax.train.runner import Runner, Steps
from infir2_jax.train.state import TrainState, init_state, make_train_step

__all__ = ["Runner", "Steps", "TrainState", "init_state", "make_train_step", "train"]
