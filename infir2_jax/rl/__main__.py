"""python -m infir2_jax.rl --config NAME [--set section.key=value ...]"""

from __future__ import annotations

import sys

from infir2_jax.train.cli import run_command


def _run(cfg) -> None:
    from infir2_jax.rl.loop import run

    run(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m infir2_jax.rl", __doc__, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
