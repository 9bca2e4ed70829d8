"""Shared start-up of the converter CLIs.

Lets `python converters/X.py` import infir2_jax from a source checkout without installing, and
turns the errors a user can cause (bad paths, mismatched checkpoints) into one-line messages
with exit status 2 instead of tracebacks.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax.checkpoint import CheckpointError  # noqa: E402
from infir2_jax.cli import USAGE, Exit, attempt, command_parser  # noqa: E402

USER_ERRORS = (CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A converter's parser: its docstring's examples shown as written."""
    return command_parser(None, doc, raw_doc=True)


def run(convert: Callable[[], Path]) -> int:
    status, out = attempt(convert, Exit(USER_ERRORS, USAGE))
    if status == 0:
        print(f"wrote {out}")
    return status
