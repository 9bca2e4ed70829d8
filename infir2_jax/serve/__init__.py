"""An OpenAI-compatible HTTP server over the generation engine (`python -m infir2_jax.serve`)."""

from infir2_jax.serve.app import create_app
from infir2_jax.serve.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]
