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


def test_a_longer_rerun_warns_how_the_learning_rate_changes(tmp_path):
    """Raising train.steps of a finished run continues it under the new (longer) schedule; the
    log says so with the learning rate before and after, instead of a silent jump."""
    from infir2_jax.train.optimizer import learning_rate_schedule

    train(_config(tmp_path / "run", "train.steps=6"), out=io.StringIO())
    longer = _config(tmp_path / "run", "train.steps=12")
    out = io.StringIO()
    history = train(longer, out=out)
    new = float(learning_rate_schedule(longer.optim, 12)(6))
    old = float(learning_rate_schedule(longer.optim, 6)(6))
    assert old != pytest.approx(new)
    assert (
        "warning: the LR schedule differs from the checkpoint's (train.steps 6 -> 12): this "
        f"config's schedule applies from step 7 on, LR {new:.2e}; the checkpoint's would give "
        f"{old:.2e}"
    ) in out.getvalue()
    assert history[0]["step"] == 7 and history[0]["lr"] == pytest.approx(new, rel=1e-6)
    # The same command again: nothing changed, nothing to say.
    out = io.StringIO()
    train(_config(tmp_path / "run", "train.steps=12"), out=out)
    assert "schedule" not in out.getvalue()


def test_a_run_that_saved_nothing_does_not_tie_its_directory_to_a_model(tmp_path):
    # Fails on its first batch (byte tokens do not fit a 100-token vocabulary), before saving.
    with pytest.raises(ValueError, match="model.vocab_size=100"):
        train(_config(tmp_path / "run", "model.vocab_size=100"), out=io.StringIO())
    assert (tmp_path / "run" / "config.yaml").is_file()
    history = train(_config(tmp_path / "run", "train.steps=2"), out=io.StringIO())
    assert [m["step"] for m in history] == [1, 2]


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
    # Cross-device gradient sums round differently in the last bit of BF16; Adam's first
    # updates (m/√v ≈ ±1 per element) turn such bits into ±lr steps for tiny gradients, and
    # with FP8 a bit can flip a weight's FP8 rounding at the next step. Steps 2-3 therefore
    # agree to ~3e-5 (BF16) / 2e-4 (FP8); step 1 to 2e-6 in BF16, 4e-5 with FP8 (a BF16 bit
    # can flip an activation's FP8 rounding already in the first forward). (Per-device amax
    # histories would give different scales: errors of 1e-2.)
    np.testing.assert_allclose(losses[8][0], losses[1][0], rtol=5e-6 if recipe == "none" else 1e-4)
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-4 if recipe == "none" else 5e-4)


def test_sigterm_checkpoints_and_the_rerun_continues_exactly(tmp_path):
    """SLURM pre-emption: SIGTERM mid-run saves the finished step and exits 143; the same
    command then resumes and reproduces the uninterrupted run."""
    import signal

    overrides = [*SHORT, "train.steps=200", "checkpoint.every=1000", "data.record_samples=true"]
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
    # The same samples, step for step: the data position was restored, not recomputed.
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert samples == (tmp_path / "full" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in samples] == list(range(1, 201))


def test_sigterm_right_after_a_checkpointed_step_saves_once_and_exits_143(tmp_path, monkeypatch):
    """With checkpoint.every=1, a SIGTERM arriving just after a step was saved must not save
    that step again (Orbax refuses: StepAlreadyExistsError, exit 1): the run leaves through
    Preempted, exit 143, its checkpoints intact."""
    import signal

    from infir2_jax.train.__main__ import main
    from infir2_jax.train.runner import Runner

    save, sent = Runner.save, []

    def save_then_terminate(self, state, step):
        saved = save(self, state, step)
        if step == 2 and not sent:  # deterministic: the signal lands between two steps
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # only recorded by the runner's handler
        return saved

    monkeypatch.setattr(Runner, "save", save_then_terminate)
    run = tmp_path / "run"
    args = ["--config", "tiny_cpt"]
    for o in [*SHORT, "checkpoint.every=1", f"train.run_dir={run}"]:
        args += ["--set", o]
    assert main(args) == 143
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [1, 2]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    # A stop before the first step of the rerun: the step it resumed from is saved already.
    from infir2_jax.train.stopping import StopRequest

    class Requested(StopRequest):
        def __init__(self):
            super().__init__()
            self.requested = "SIGTERM"

    monkeypatch.setattr(Runner, "save", save)
    monkeypatch.setattr("infir2_jax.train.runner.StopRequest", Requested)
    assert main(args) == 143
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [1, 2]


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    """An exploding run: non-finite steps leave the weights alone and are never checkpointed;
    N in a row stop the run (exit 3, naming the setting), the last checkpoint holding the
    finite weights of the last finite step."""
    run = tmp_path / "run"
    overrides = [*SHORT, f"train.run_dir={run}", "optim.lr=1e9", "optim.warmup_steps=0",
                 "train.max_nonfinite_streak=3", "checkpoint.every=1"]  # fmt: skip
    cmd = [sys.executable, "-m", "infir2_jax.train", "--config", "tiny_cpt"]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "non-finite for 3 steps in a row" in r.stderr and "max_nonfinite_streak" in r.stderr
    assert "SKIPPED" in r.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["skipped"] == 0.0 and records[-1]["nonfinite_streak"] == 3
    # Only finite steps were saved; the latest checkpoint holds the (huge but finite) weights
    # of the last finite step: the skipped steps did not write NaN into them.
    finite = [rec["step"] for rec in records if rec["nonfinite_streak"] == 0]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == finite[-1]
    assert "not checkpointed" in r.stdout
    from infir2_jax.checkpoint import read_model_config, restore_params

    params = restore_params(run, read_model_config(run))
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())


def test_decay_run_continues_a_stable_checkpoint_with_its_optimizer_state(tmp_path):
    """The recipe's decay job: resume a stable-phase checkpoint of another run with warmup 0
    and a new schedule; with Adam moments, FP8 state and data position carried over, it
    matches the one-job WSD run step for step (a reset optimizer would not)."""
    wsd = ["optim.warmup_steps=2", "optim.decay_start=8", "optim.decay_steps=4",
           "optim.decay_style=cosine", "optim.min_lr=1e-4", "fp8.recipe=delayed"]  # fmt: skip
    full = train(_config(tmp_path / "full", *wsd), out=io.StringIO())
    train(_config(tmp_path / "stable", *wsd, "train.steps=8"), out=io.StringIO())
    decay = [
        f"train.resume_from={tmp_path / 'stable' / 'checkpoints' / '8'}",
        "optim.warmup_steps=0",
        "optim.decay_start=8",
        "optim.decay_steps=4",
        "optim.min_lr=1e-4",
        "fp8.recipe=delayed",
    ]
    out = io.StringIO()
    resumed = train(_config(tmp_path / "decay", *decay), out=out)
    assert "continuing" in out.getvalue() and "with this config's schedule" in out.getvalue()
    # The schedule change is expected here: said, with the rates, but not as a warning.
    assert (
        "the LR schedule differs from the checkpoint's (train.steps 8 -> 12, "
        "optim.warmup_steps 2 -> 0)"
        in out.getvalue()
        and "warning" not in out.getvalue()
    )
    assert [m["step"] for m in resumed] == [9, 10, 11, 12]
    reference = {m["step"]: m for m in full}
    for m in resumed:
        np.testing.assert_allclose(m["loss"], reference[m["step"]]["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["lr"], reference[m["step"]]["lr"], rtol=1e-6)
    assert resumed[-1]["lr"] < resumed[0]["lr"]

    fresh = train(_config(tmp_path / "fresh", *decay, "train.resume_from=null",
                          f"train.init_from={tmp_path / 'stable'}"), out=io.StringIO())  # fmt: skip
    assert abs(fresh[1]["loss"] - reference[10]["loss"]) > 1e-4  # new Adam state differs

    # A converted model has weights only: resume_from refuses it, naming init_from instead.
    from infir2_jax.checkpoint.convert import hf_to_orbax

    orbax_to_hf(tmp_path / "stable", tmp_path / "hf", dtype="float32")
    hf_to_orbax(tmp_path / "hf", tmp_path / "converted")
    bad = _config(tmp_path / "bad", f"train.resume_from={tmp_path / 'converted'}")
    with pytest.raises(ConfigError, match="no optimizer state.*train.init_from"):
        train(bad, out=io.StringIO())


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Reads TensorBoard event files (TFRecord framing) with tensorboardX's protobufs."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_and_wandb_receive_the_metrics(tmp_path, monkeypatch):
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = _config(tmp_path / "run", "train.steps=3", "logging.wandb=true",
                  "logging.wandb_project=demo")  # fmt: skip
    history = train(cfg, out=io.StringIO())
    scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [m["loss"] for m in history],
                               rtol=1e-6)  # fmt: skip
    assert {"lr", "grad_norm", "tokens_per_sec"} <= set(scalars)
    (init_kwargs,) = calls["init"]
    assert init_kwargs["project"] == "demo" and init_kwargs["name"] == "run"
    assert init_kwargs["config"]["train"]["steps"] == 3 and init_kwargs["resume"] == "allow"
    assert [step for step, _ in calls["log"]] == [1, 2, 3] and calls["finish"] == 1
    assert calls["log"][0][1]["loss"] == pytest.approx(history[0]["loss"])


def test_tiny_sft_trains_on_assistant_tokens_with_validation(tmp_path):
    # The shipped config as it is (bundled GSM8K, built-in tokenizer), made shorter.
    cfg = load_config("tiny_sft", [
        f"train.run_dir={tmp_path / 'run'}", "train.steps=4", "train.batch_size=2",
        "train.seq_len=256", "train.eval_every=2", "train.log_every=1",
        "model.num_layers=2"])  # fmt: skip
    history = train(cfg, out=io.StringIO())
    steps = [m for m in history if "loss" in m]
    evals = [m for m in history if "eval_loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and [m["step"] for m in evals] == [2, 4]
    assert all(np.isfinite(m["loss"]) for m in steps)
    # The loss covers assistant tokens only: well under the 2 x 256 positions of a batch.
    assert all(0 < m["loss_tokens"] < 0.8 * 2 * 256 for m in steps)
    assert steps[-1]["truncated_samples"] > 0  # 256-token rows truncate some GSM8K pairs


def test_a_mixture_logs_its_realized_shares_and_checkpoints_its_counts(tmp_path):
    mixture = "data.sources=[{source: synthetic, weight: 1, name: a}, {source: synthetic, weight: 3, name: b}]"  # noqa: E501
    cfg = _config(tmp_path / "run", mixture, "train.steps=4")
    out = io.StringIO()
    history = train(cfg, out=out)
    assert "data mixture (share of rows): a 0.250 (2,000 documents), b 0.750" in out.getvalue()
    # 16 rows in all: grain's interleaving draws exactly 4 from a.
    assert history[-1]["mix/a"] == 0.25 and history[-1]["mix/b"] == 0.75
    meta = json.loads(next((tmp_path / "run/checkpoints/4").rglob("meta/metadata")).read_text())
    assert (meta["rows/a"], meta["rows/b"]) == (4, 12)  # a rerun continues from these


def test_eta_counts_the_evaluations_left(monkeypatch):
    """The ETA is the steps left at the step time (evaluations excluded) plus the evaluations
    left at their mean time; before one is timed, it says how many it leaves out."""
    import io

    from infir2_jax.train import metrics

    clock = iter([0.0, 1.0, 15.0, 18.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    logger = metrics.MetricsLogger(None, total_steps=10, resume_step=0, out=out, eval_every=5)
    values = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0}
    logger.log(1, values, 1.0)  # t=0: timing starts
    logger.log(2, values, 1.0)  # t=1: 1 s per step, 8 steps and the evaluations at 5 and 10
    logger.eval_took(10.0)  # the evaluation at step 5
    logger.log(6, values, 1.0)  # t=15: 15 s less the evaluation over 5 steps; 4 + 1 eval left
    logger.log(9, values, 1.0)  # t=18: 1 s per step; 1 step and 1 evaluation (10 s) left
    etas = [line.split("ETA ")[1] for line in out.getvalue().splitlines()]
    assert etas == ["--", "0m08s + 2 evals", "0m14s", "0m11s"]
