"""The command line shared by every training objective (`python -m infir2_jax.train`,
`python -m infir2_jax.rl`): --config NAME [--set section.key=value ...], and exit statuses."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from infir2_jax.cli import USAGE, Exit, add_config, add_set, command_parser, run_main


def run_command(
    prog: str,
    doc: str,
    job: Callable[[Any], Any],
    argv: list[str] | None = None,
    *,
    default_config: str | None = None,
) -> int:
    """Parses the arguments, starts the processes and runs `job(config)`. Exit status 0; 2 for
    a bad config / data / checkpoint (the message names it); 3 when the loss stayed
    non-finite; 1 when a checkpoint could not be written (the previous one intact); 128 +
    SIGTERM after a pre-emption. `job` takes the parsed `RunConfig`; it imports what it runs,
    so `--help` answers before anything heavy (JAX) is loaded. Without `default_config`,
    `--config` is required."""
    parser = command_parser(prog, doc)
    add_config(parser, default=default_config)
    add_set(parser)
    args = parser.parse_args(argv)

    from infir2_jax.checkpoint import CheckpointError
    from infir2_jax.config import ConfigError, load_config
    from infir2_jax.data import DataError
    from infir2_jax.parallel.distributed import DistributedError, initialize
    from infir2_jax.train.checkpointing import CheckpointSaveFailed
    from infir2_jax.train.stopping import NonFiniteLoss, Preempted

    def start() -> None:
        cfg = load_config(args.config, args.set)
        print(f"processes: {initialize()}", flush=True)
        job(cfg)

    return run_main(
        start,
        Exit((ConfigError, DataError, CheckpointError, DistributedError, FileNotFoundError), USAGE),
        Exit(NonFiniteLoss, 3),
        Exit(CheckpointSaveFailed, 1),
        Exit(Preempted, 128 + signal.SIGTERM, message=""),  # a SIGTERM'd job's usual status
    )
