"""Documents from a JSONL file, tokenized with a local Hugging Face tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


def read_jsonl_texts(path: str | Path, field: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{number}: missing field {field!r}")
            if not isinstance(record[field], str):
                raise DataError(f"{path}:{number}: field {field!r} is not a string")
            texts.append(record[field])
    if not texts:
        raise DataError(f"{path}: no documents")
    return texts


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        raise DataError("data.tokenizer: a local tokenizer directory is required for jsonl data")
    if not Path(path).is_dir():
        raise DataError(f"data.tokenizer: {path}: tokenizer directory not found")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer: {path}: cannot load a tokenizer ({e})") from None


def tokenize_documents(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Token ids of each text followed by the tokenizer's EOS (document separator)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("data.tokenizer: the tokenizer defines no eos_token")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.array([*ids, eos], dtype=np.int32) for ids in encoded]
