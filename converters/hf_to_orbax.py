"""Hugging Face Qwen2 directory -> Orbax model checkpoint.

Same as the console script `infir2-hf-to-orbax` of an installed package; `--help` for usage.
"""

import sys

import _bootstrap  # noqa: F401  (a source checkout's infir2_jax on sys.path)

from infir2_jax.checkpoint.commands import hf_to_orbax_main as main

if __name__ == "__main__":
    sys.exit(main())
