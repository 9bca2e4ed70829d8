"""Lets `python converters/X.py` import infir2_jax from a source checkout without installing.
The commands themselves live in `infir2_jax/checkpoint/commands.py` (console scripts
`infir2-hf-to-orbax`, `infir2-orbax-to-hf`, `infir2-hf-to-fp8` once installed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
