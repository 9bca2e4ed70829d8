"""A fresh clone works on its own: the repository's files, copied into a directory with nothing
beside it (a user's clone has no sibling `shared/` or anything else of ours), train the tiny
default and pass an SFT data test, and no file reads outside the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# Paths that reach outside the repository root for data or docs.
OUTSIDE = re.compile(r"\.\./shared|parent\s*/\s*[\"']shared[\"']|\.parent\.parent\.parent")


def _repository_files() -> list[str]:
    """What a commit of this work tree holds: tracked files plus new ones git does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the files of a clone are unknown")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [f for f in listed.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("fresh") / "infir2-jax"
    for name in _repository_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _run(clone: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_no_file_reads_outside_the_repository(clone):
    offenders = []
    for path in clone.rglob("*"):
        if path.suffix in (".py", ".yaml", ".yml", ".sh", ".sbatch", ".toml", ".txt", ".md"):
            if path.name == Path(__file__).name:
                continue  # this file names the patterns it looks for
            if OUTSIDE.search(path.read_text(errors="replace")):
                offenders.append(str(path.relative_to(clone)))
    assert not offenders, f"these files refer to paths outside the repository: {offenders}"


def test_the_tiny_default_trains_in_a_fresh_clone(clone, tmp_path):
    r = _run(clone, "-c", "import infir2_jax; print(infir2_jax.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).is_relative_to(clone)  # the clone's code, not this checkout's
    r = _run(
        clone, "-m", "infir2_jax.train", "--config", "tiny_cpt",
        "--set", "train.steps=3", "--set", "train.log_every=1",
        "--set", f"train.run_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 3 steps" in r.stdout


def test_sft_data_test_passes_in_a_fresh_clone(clone):
    """The SFT data (bundled GSM8K, built-in Qwen tokenizer) as the clone's own test uses it."""
    test = "tests/test_sft_data.py::test_packed_sft_rows_hold_each_sample_whole_once"
    r = _run(clone, "-m", "pytest", "-q", "-p", "no:cacheprovider", test)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout
