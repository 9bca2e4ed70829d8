"""Orbax checkpoint or run directory -> Hugging Face directory.

Same as the console script `infir2-orbax-to-hf` of an installed package; `--help` for usage.
"""

import sys

import _bootstrap  # noqa: F401  (a source checkout's infir2_jax on sys.path)

from infir2_jax.checkpoint.commands import orbax_to_hf_main as main

if __name__ == "__main__":
    sys.exit(main())
