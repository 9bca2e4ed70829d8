"""The skeleton every command line shares: its parser's --config / --set arguments, and the
mapping from the errors a user can cause to one `error: ...` line on stderr and an exit status.

Each command names its own errors and statuses (`Exit`), so its contract stays in its
`__main__`; this module imports nothing heavy, so a command loads only what it uses.

    args = command_parser("python -m infir2_jax.x", __doc__, config=True).parse_args(argv)
    return run_main(lambda: job(args), Exit((ConfigError, DataError), USAGE))
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

USAGE = 2  # a bad config, flag, path or input: the message names it
CONFIG_HELP = "a name in configs/ or a YAML path"
SET_METAVAR = "SECTION.KEY=VALUE"
SET_HELP = "override one config value (repeatable), e.g. --set train.steps=60"
# generate / serve: --set takes the model-loading sections only.
MODEL_SET_HELP = "model.* (e.g. model.dtype=float32), fp8.* or parallel.* (repeatable)"


class _ShowDefaults(argparse.HelpFormatter):
    """Ends an option's help with `(default: X)` where X says something (not None, False or
    an empty list) and the help does not already name its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == []
        if quiet or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _RawShowDefaults(argparse.RawDescriptionHelpFormatter, _ShowDefaults):
    pass


def command_parser(
    prog: str | None, doc: str | None, *, raw_doc: bool = False
) -> argparse.ArgumentParser:
    """The parser of one command, whose help shows each option's default; `raw_doc` keeps the
    docstring's line breaks (its examples). Run as a console script (`infir2-train`), usage
    names that script instead of `prog`."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog is not None and script.startswith("infir2-"):
        prog = script
    formatter = _RawShowDefaults if raw_doc else _ShowDefaults
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=formatter)


def add_config(
    parser: argparse.ArgumentParser, help: str = CONFIG_HELP, default: str | None = None
) -> None:
    """--config NAME: required unless the command has a `default` config."""
    if default is None:
        parser.add_argument("--config", required=True, help=help)
    else:
        parser.add_argument("--config", default=default, help=f"{help} (default: {default})")


def add_set(
    parser: argparse.ArgumentParser, help: str | None = SET_HELP, metavar: str = SET_METAVAR
) -> None:
    """--set section.key=value, repeatable (a list of the assignments, in order)."""
    parser.add_argument("--set", action="append", default=[], metavar=metavar, help=help)


@dataclasses.dataclass(frozen=True)
class Exit:
    """An exception of `errors` ends the command with `status`, after printing `message` to
    stderr (None: `error: <the exception>`; "": nothing)."""

    errors: type[BaseException] | tuple[type[BaseException], ...]
    status: int
    message: str | None = None


def attempt(body: Callable[[], T], *exits: Exit) -> tuple[int, T | None]:
    """(0, body()); or, when body raises an error of one of `exits` (the first that matches,
    as `except` clauses in order), (its status, None) with its message printed."""
    caught = tuple(
        t for x in exits for t in (x.errors if isinstance(x.errors, tuple) else (x.errors,))
    )
    try:
        return 0, body()
    except caught as e:
        match = next(x for x in exits if isinstance(e, x.errors))
        text = f"error: {e}" if match.message is None else match.message
        if text:
            print(text, file=sys.stderr)
        return match.status, None


def run_main(body: Callable[[], object], *exits: Exit) -> int:
    """The exit status of running `body` (see `attempt`)."""
    return attempt(body, *exits)[0]
