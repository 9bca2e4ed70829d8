"""A local Hugging Face tokenizer, loaded once per process (grain pickles transforms into
worker processes; the path travels, the loaded tokenizer does not)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from infir2_jax.data.bundled import ASSETS, QWEN_TOKENIZER, qwen_tokenizer_dir
from infir2_jax.data.byte_tokenizer import BYTE_TOKENIZER
from infir2_jax.data.records import DataError

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Built-in tokenizer names -> where their files are (found when asked for: qwen's is a package).
BUILTIN_TOKENIZERS = {
    QWEN_TOKENIZER: qwen_tokenizer_dir,  # the Qwen BPE tokenizer, data/bundled.py
    BYTE_TOKENIZER: lambda: ASSETS / "byte_tokenizer",  # one token per byte, data/byte_tokenizer.py
}


def chat_template_path(name: str) -> Path:
    """A built-in template by name (e.g. "qwen2.5", templates/*.jinja) or a Jinja file path."""
    builtin = TEMPLATES / f"{name}.jinja"
    if builtin.is_file():
        return builtin
    if not Path(name).is_file():
        known = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
        raise DataError(f"data.chat_template: {name}: not a file nor a built-in ({known})")
    return Path(name)


def tokenizer_dir(path: str | None, key: str = "data.tokenizer") -> Path:
    """A local tokenizer directory, or a name of BUILTIN_TOKENIZERS. Errors name the config
    `key` that gave `path`."""
    if path is None:
        raise DataError(
            f"{key}: a local tokenizer directory (or a built-in: "
            f"{', '.join(map(repr, BUILTIN_TOKENIZERS))}) is required for text data"
        )
    if Path(path).is_dir():
        return Path(path)
    if path in BUILTIN_TOKENIZERS:
        return BUILTIN_TOKENIZERS[path]()
    raise DataError(f"{key}: {path}: tokenizer directory not found")


def load_tokenizer(path: str | None, chat_template: str | None = None):
    """The tokenizer at `path` (see `tokenizer_dir`); `chat_template` (see
    `chat_template_path`) replaces the tokenizer's own template."""
    from transformers import AutoTokenizer

    path = tokenizer_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer: {path}: cannot load a tokenizer ({e})") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template_path(chat_template).read_text()
    return tokenizer


class LazyTokenizer:
    """Loaded on first use, once per process; grain maps records on a thread pool, hence the
    lock (concurrent first imports of transformers fail)."""

    def __init__(self, path: str | None, chat_template: str | None = None):
        self.path, self.chat_template = path, chat_template
        self._tokenizer = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._tokenizer is None:
                # Workers and threads tokenize in parallel already; nested pools only contend.
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                self._tokenizer = load_tokenizer(self.path, self.chat_template)
        return self._tokenizer

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
