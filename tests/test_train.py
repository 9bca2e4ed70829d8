"""The training loop: the tiny default learns, resumes bit-for-bit, writes the run contract."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import ROOT

import infir2_jax
from infir2_jax.checkpoint.convert import orbax_to_hf
from infir2_jax.config import ConfigError, load_config
from infir2_jax.train import train

# A short version of the tiny default: same model and data, fewer and smaller steps.
SHORT = ["train.steps=12", "train.batch_size=4", "train.seq_len=64", "train.log_every=1",
         "checkpoint.every=4", "optim.warmup_steps=3", "data.synthetic_documents=2000"]  # fmt: skip


def _config(run_dir, *extra):
    return load_config("tiny_cpt", [*SHORT, f"train.run_dir={run_dir}", *extra])


def test_tiny_default_learns(tmp_path):
    cfg = load_config(
        "tiny_cpt", [f"train.run_dir={tmp_path}", "train.steps=60", "train.log_every=10"]
    )
    history = train(cfg, out=io.StringIO())
    first, last = history[0]["loss"], history[-1]["loss"]
    assert history[0]["step"] == 1 and history[-1]["step"] == 60
    assert first > 5.0  # ~ln(257) at random init
    assert last < 0.5 * first, (first, last)


class _StopAtStep(io.StringIO):
    """A console that raises once the run reports `step`, like a crash mid-run."""

    def __init__(self, step: int, total: int):
        super().__init__()
        self.marker = f"step {step:>{len(str(total))}}/{total}"

    def write(self, text: str) -> int:
        if text.startswith(self.marker):
            raise KeyboardInterrupt("simulated crash")
        return super().write(text)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = train(_config(tmp_path / "full"), out=io.StringIO())

    cfg = _config(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=_StopAtStep(7, 12))  # dies after step 6; last checkpoint is step 4
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["4"]
    out = io.StringIO()
    resumed = train(cfg, out=out)  # the same command again
    assert "resumed from" in out.getvalue()
    assert [m["step"] for m in resumed] == list(range(5, 13))

    full_losses = {m["step"]: m["loss"] for m in full}
    for m in resumed:
        np.testing.assert_allclose(m["loss"], full_losses[m["step"]], rtol=1e-6)
    # metrics.jsonl reads as one run: steps 1..12 once each, the crashed 5..6 replaced.
    records = [
        json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert {"step", "loss", "grad_norm", "lr", "tokens_per_sec"} <= set(r)
    # Running again once finished does nothing.
    assert train(cfg, out=io.StringIO()) == []


def test_run_directory_contract_and_checkpoint_export(tmp_path):
    cfg = _config(tmp_path / "run", "train.steps=4")
    train(cfg, out=io.StringIO())
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 4 and saved["model"]["vocab_size"] == 257
    assert (run / "checkpoints" / "4").is_dir()

    # A training run directory loads directly and exports to HF.
    model = infir2_jax.from_pretrained(run, dtype="float32")
    ids = jnp.asarray(np.arange(10)[None])
    logits = np.asarray(model(ids))
    orbax_to_hf(run, tmp_path / "hf", dtype="float32")
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = hf(torch.tensor(np.arange(10)[None])).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4

    # Changing the model of an existing run is refused, naming the key.
    with pytest.raises(ConfigError, match="model.hidden_size"):
        train(_config(tmp_path / "run", "model.hidden_size=64"), out=io.StringIO())


def test_init_from_hf_directory(tmp_path):
    cfg = _config(tmp_path / "a", "train.steps=2")
    train(cfg, out=io.StringIO())
    orbax_to_hf(tmp_path / "a", tmp_path / "hf", dtype="float32")
    cfg_b = _config(tmp_path / "b", "train.steps=3", f"train.init_from={tmp_path / 'hf'}")
    history = train(cfg_b, out=io.StringIO())
    scratch = train(_config(tmp_path / "c", "train.steps=1"), out=io.StringIO())
    assert history[0]["loss"] < scratch[0]["loss"]  # starts from the trained weights


@pytest.mark.parametrize("recipe", ["none", "delayed"])
def test_data_parallel_matches_single_device(tmp_path, recipe):
    """8 fake CPU devices (batch split 8 ways) give the same losses as one device; with
    delayed scaling the amax histories are global (else steps 2-3 would differ)."""
    script = (
        "import io, sys, json\n"
        "from infir2_jax.config import load_config\n"
        "from infir2_jax.train import train\n"
        f"cfg = load_config('tiny_cpt', {SHORT!r} + ['train.batch_size=16', 'train.steps=3', "
        f"'fp8.recipe={recipe}', 'train.micro_batches=2', "
        "'train.run_dir=' + sys.argv[1], 'parallel.data=' + sys.argv[2]])\n"
        "print(json.dumps([m['loss'] for m in train(cfg, out=io.StringIO())]))\n"
    )
    losses = {}
    for devices in (1, 8):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        r = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / str(devices)), str(devices)],
            capture_output=True, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        losses[devices] = json.loads(r.stdout.strip().splitlines()[-1])
    # Cross-device gradient sums round differently in the last bit; with FP8 such a bit can
    # flip a weight's FP8 rounding at the next step, hence the looser bound for delayed.
    # (Per-device amax histories would give different scales: errors of 1e-2, not 1e-5.)
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5 if recipe == "none" else 1e-4)


def test_sigterm_checkpoints_and_the_rerun_continues_exactly(tmp_path):
    """SLURM pre-emption: SIGTERM mid-run saves the finished step and exits 143; the same
    command then resumes and reproduces the uninterrupted run."""
    import signal

    overrides = [*SHORT, "train.steps=200", "checkpoint.every=1000"]
    cmd = [sys.executable, "-m", "infir2_jax.train", "--config", "tiny_cpt",
           "--set", f"train.run_dir={tmp_path / 'run'}"]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step   2/200"):
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 143, "".join(lines)
    stopped = [x for x in lines if x.startswith("stopped by SIGTERM after step")]
    assert stopped, "".join(lines)
    k = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 2 <= k < 200
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [str(k)]

    resumed = train(
        load_config("tiny_cpt", [*overrides, f"train.run_dir={tmp_path / 'run'}"]),
        out=io.StringIO(),
    )
    full = train(
        load_config("tiny_cpt", [*overrides, f"train.run_dir={tmp_path / 'full'}"]),
        out=io.StringIO(),
    )
    assert resumed[0]["step"] == k + 1
    full_losses = {m["step"]: m["loss"] for m in full}
    for m in resumed:
        np.testing.assert_allclose(m["loss"], full_losses[m["step"]], rtol=1e-6)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    """An exploding run: non-finite steps leave the weights alone; N in a row stop the run
    (exit 3, naming the setting) without saving, the last checkpoint holding finite weights."""
    run = tmp_path / "run"
    overrides = [*SHORT, f"train.run_dir={run}", "optim.lr=1e9", "optim.warmup_steps=0",
                 "train.max_nonfinite_streak=3", "checkpoint.every=2"]  # fmt: skip
    cmd = [sys.executable, "-m", "infir2_jax.train", "--config", "tiny_cpt"]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "non-finite for 3 steps in a row" in r.stderr and "max_nonfinite_streak" in r.stderr
    assert "SKIPPED" in r.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["skipped"] == 0.0 and records[-1]["nonfinite_streak"] == 3
    # The latest checkpoint holds the (huge but finite) weights of the last finite step: the
    # skipped steps did not write NaN into them.
    from infir2_jax.checkpoint import read_model_config, restore_params

    params = restore_params(run, read_model_config(run))
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())
