"""What one request may ask of the server; a module of its own so that `serve --help` shows
the defaults without importing the engine."""

from __future__ import annotations

import dataclasses

DEFAULT_MAX_SAMPLES = 1024  # prompts × n per request
DEFAULT_MAX_BODY = 1 << 20  # bytes


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask: `max_samples` prompts × n, a body of `max_body` bytes."""

    max_samples: int = DEFAULT_MAX_SAMPLES
    max_body: int = DEFAULT_MAX_BODY
