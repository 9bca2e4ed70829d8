"""python -m infir2_jax.train --config NAME [--set section.key=value ...]"""

from __future__ import annotations

import argparse
import sys

from infir2_jax.checkpoint import CheckpointError
from infir2_jax.config import ConfigError, load_config
from infir2_jax.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infir2_jax.train", description=__doc__)
    parser.add_argument("--config", required=True, help="a name in configs/ or a YAML path")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.steps=60",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from infir2_jax.train.loop import train  # imports JAX; keep config errors fast

        train(cfg)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
