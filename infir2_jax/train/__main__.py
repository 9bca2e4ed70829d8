"""python -m infir2_jax.train --config NAME [--set section.key=value ...]"""

from __future__ import annotations

import sys

from infir2_jax.train.cli import run_command
from infir2_jax.train.loop import train


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m infir2_jax.train", __doc__, train, argv)


if __name__ == "__main__":
    sys.exit(main())
