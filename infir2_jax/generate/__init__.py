"""The generation engine: KV-cache sampling with exact log-probabilities (RL rollouts, the
`python -m infir2_jax.generate` command)."""

from infir2_jax._lazy import lazy_exports

__all__ = ["Completion", "Engine", "SamplingParams", "Stats", "sample", "sampling_logprobs"]
# Imported on first use: `python -m infir2_jax.generate --help` loads no JAX.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["Completion", "Engine", "Stats"], "infir2_jax.generate.engine"),
        **dict.fromkeys(
            ["SamplingParams", "sample", "sampling_logprobs"], "infir2_jax.generate.sampling"
        ),
    },
)
