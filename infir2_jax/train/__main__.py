"""python -m infir2_jax.train [--config NAME] [--set section.key=value ...]

Trains the run a config describes (default: tiny_cpt, the embedded tiny demo), resuming from
its run directory's latest checkpoint (`train.run_dir`, relative to the current directory).
"""

from __future__ import annotations

import sys

from infir2_jax.train.cli import run_command

DEFAULT_CONFIG = "tiny_cpt"


def _train(cfg) -> None:
    from infir2_jax.train.loop import train

    train(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_command(
        "python -m infir2_jax.train", __doc__, _train, argv, default_config=DEFAULT_CONFIG
    )


if __name__ == "__main__":
    sys.exit(main())
