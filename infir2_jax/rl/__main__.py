"""python -m infir2_jax.rl --config NAME [--set section.key=value ...]"""

from __future__ import annotations

import argparse
import signal
import sys

from infir2_jax.checkpoint import CheckpointError
from infir2_jax.config import ConfigError, load_config
from infir2_jax.data import DataError
from infir2_jax.parallel.distributed import DistributedError, initialize
from infir2_jax.rl.loop import run
from infir2_jax.train.stopping import NonFiniteLoss, Preempted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infir2_jax.rl", description=__doc__)
    parser.add_argument("--config", required=True, help="a name in configs/ or a YAML path")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set rl.n=8",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        print(f"processes: {initialize()}", flush=True)
        run(cfg)
    except (ConfigError, DataError, CheckpointError, DistributedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted:
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
