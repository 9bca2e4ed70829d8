"""Shared start-up of the converter CLIs.

Lets `python converters/X.py` import infir2_jax from a source checkout without installing, and
turns the errors a user can cause (bad paths, mismatched checkpoints) into one-line messages
with exit status 2 instead of tracebacks.
"""

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax.checkpoint import CheckpointError  # noqa: E402

USER_ERRORS = (CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def run(convert: Callable[[], Path]) -> int:
    try:
        out = convert()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
