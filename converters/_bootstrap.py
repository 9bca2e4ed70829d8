"""Lets `python converters/X.py` import infir2_jax from a source checkout without installing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
