"""An OpenAI-compatible HTTP server over the generation engine (`python -m infir2_jax.serve`)."""

from infir2_jax._lazy import lazy_exports

__all__ = ["Scheduler", "create_app"]
# Imported on first use: `python -m infir2_jax.serve --help` loads no JAX.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"create_app": "infir2_jax.serve.app", "Scheduler": "infir2_jax.serve.scheduler"},
)
