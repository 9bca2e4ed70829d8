"""The command line shared by every training objective (`python -m infir2_jax.train`,
`python -m infir2_jax.rl`): --config NAME [--set section.key=value ...], and exit statuses."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

from infir2_jax.checkpoint import CheckpointError
from infir2_jax.config import ConfigError, RunConfig, load_config
from infir2_jax.data import DataError
from infir2_jax.parallel.distributed import DistributedError, initialize
from infir2_jax.train.stopping import NonFiniteLoss, Preempted


def run_command(
    prog: str, doc: str, job: Callable[[RunConfig], Any], argv: list[str] | None = None
) -> int:
    """Parses the arguments, starts the processes and runs `job(config)`. Exit status 0, 2 for
    a bad config / data / checkpoint (the message names it), 3 when the loss stayed
    non-finite, 128 + SIGTERM after a pre-emption checkpoint."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--config", required=True, help="a name in configs/ or a YAML path")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.steps=60",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        print(f"processes: {initialize()}", flush=True)
        job(cfg)
    except (ConfigError, DataError, CheckpointError, DistributedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted:
        return 128 + signal.SIGTERM  # the conventional status of a SIGTERM'd job
    return 0
