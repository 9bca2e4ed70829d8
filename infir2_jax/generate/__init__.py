"""The generation engine: KV-cache sampling with exact log-probabilities (RL rollouts, the
`python -m infir2_jax.generate` command)."""

from infir2_jax.generate.engine import Completion, Engine, Stats
from infir2_jax.generate.sampling import SamplingParams, sample, sampling_logprobs

__all__ = ["Completion", "Engine", "SamplingParams", "Stats", "sample", "sampling_logprobs"]
