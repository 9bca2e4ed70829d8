"""Checkpoints a run can trust: checksums, dtypes and finite values verified on restore, a
failing checkpoint named and moved aside while the previous one is used, a failed save
reported at once as one line with the previous checkpoint intact."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infir2_jax.config import CheckpointConfig, load_config
from infir2_jax.train.checkpointing import (
    CORRUPT_DIR,
    CheckpointSaveFailed,
    TrainCheckpointer,
)
from infir2_jax.train.integrity import MANIFEST, CheckpointCorrupt
from infir2_jax.train.setup import initial_state, prepare
from infir2_jax.train.stopping import NonFiniteLoss


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny_cpt", ["train.run_dir=unused"])
    setup = prepare(cfg)
    state = initial_state(cfg, setup.plan, setup.parts, setup.optimizer, setup.state_sharding)
    return cfg, setup, state


def _save(directory: Path, cfg, state, steps, **options) -> TrainCheckpointer:
    checkpointer = TrainCheckpointer(directory, CheckpointConfig(**options))
    for step in steps:
        checkpointer.save(state.replace(step=jnp.int32(step)), cfg.model, None, {})
    checkpointer.close()
    return TrainCheckpointer(directory, CheckpointConfig(**options))


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in (step_dir / "params").rglob("*") if p.is_file() and "/d/" in str(p))


def test_manifest_written_and_a_flipped_block_is_caught(tmp_path, tiny):
    cfg, setup, state = tiny
    checkpointer = _save(tmp_path / "checkpoints", cfg, state, [1, 2])
    step2 = tmp_path / "checkpoints" / "2"
    assert (step2 / MANIFEST).is_file()
    victim = max(_data_files(step2), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(
        b ^ 0xFF for b in data[len(data) // 2 :][:64]
    )
    victim.write_bytes(bytes(data))
    out = io.StringIO()
    restored, step, _ = checkpointer.restore_latest(setup.abstract, None, out)
    checkpointer.close()
    assert step == 1
    assert victim.name in out.getvalue() and "contents differ" in out.getvalue()
    assert not step2.exists() and len(list((tmp_path / CORRUPT_DIR).iterdir())) == 1
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored.params, state.params)
    assert all(jax.tree.leaves(same))


def test_non_finite_and_wrong_dtype_checkpoints_are_refused(tmp_path, tiny):
    cfg, setup, state = tiny
    poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints", CheckpointConfig())
    checkpointer.save(state.replace(step=jnp.int32(1)), cfg.model, None, {})
    checkpointer.save(poisoned.replace(step=jnp.int32(2)), cfg.model, None, {})
    checkpointer.close()
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints", CheckpointConfig())
    out = io.StringIO()
    assert checkpointer.restore_latest(setup.abstract, None, out)[1] == 1
    assert "holds non-finite values" in out.getvalue()

    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params)
    bad_dtype = state.replace(params=half, step=jnp.int32(3))
    checkpointer.save(bad_dtype, cfg.model, None, {})
    checkpointer.close()
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints", CheckpointConfig())
    out = io.StringIO()
    assert checkpointer.restore_latest(setup.abstract, None, out)[1] == 1
    assert "is stored as bfloat16" in out.getvalue()
    checkpointer.close()


def test_when_nothing_verifies_the_error_lists_every_checkpoint(tmp_path, tiny):
    cfg, setup, state = tiny
    checkpointer = _save(tmp_path / "checkpoints", cfg, state, [1])
    (tmp_path / "checkpoints" / "1" / MANIFEST).write_text(json.dumps({"crc32": {"meta": 1}}))
    with pytest.raises(CheckpointCorrupt, match="no checkpoint .* verifies .*1: .*meta"):
        checkpointer.restore_latest(setup.abstract, None, io.StringIO())
    checkpointer.close()


def test_full_disk_stops_with_one_line_and_the_previous_checkpoint_intact(tmp_path, tiny):
    cfg, setup, state = tiny
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(disk)])
    if mounted.returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        checkpointer = TrainCheckpointer(disk / "checkpoints", CheckpointConfig(keep=5))
        step = 0
        with pytest.raises(CheckpointSaveFailed) as failed:
            for step in range(1, 50):
                checkpointer.save(state.replace(step=jnp.int32(step)), cfg.model, None, {})
                checkpointer.check()
            checkpointer.close()
        message = str(failed.value)
        # An async save's failure surfaces at the next save (or the run's end) at the latest.
        failed_step = int(re.match(r"saving checkpoint (\d+) ", message).group(1))
        assert failed_step in (step, step - 1) and "No space left on device" in message
        assert "\n" not in message and f"checkpoint {failed_step - 1} is intact" in message
        reopened = TrainCheckpointer(disk / "checkpoints", CheckpointConfig(keep=5))
        restored = reopened.restore_latest(setup.abstract, None, io.StringIO())
        assert restored[1] == failed_step - 1
        assert not any(".orbax-checkpoint-tmp" in p.name for p in (disk / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)])


# ------------------------------------------------------------------ through a training run
SHORT = ["train.batch_size=4", "train.seq_len=64", "train.log_every=1", "optim.warmup_steps=3",
         "data.synthetic_documents=2000"]  # fmt: skip


def _run(run_dir: Path, *extra: str, out: io.StringIO | None = None) -> list:
    from infir2_jax.train import train

    cfg = load_config("tiny_cpt", [*SHORT, f"train.run_dir={run_dir}", *extra])
    return train(cfg, out=out or io.StringIO())


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(tmp_path):
    run = tmp_path / "run"
    _run(run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2")
    victim = max(_data_files(run / "checkpoints" / "4"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])
    victim.write_bytes(bytes(data))
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save
    out = io.StringIO()
    history = _run(run, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2", out=out)
    assert f"checkpoint {run / 'checkpoints' / '4'} failed verification" in out.getvalue()
    assert victim.name in out.getvalue() and "resumed from" in out.getvalue()
    assert [m["step"] for m in history] == [3, 4, 5, 6]
    assert all(np.isfinite(m["loss"]) for m in history)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "6"]
    assert [p.name.split("-")[0] for p in (run / CORRUPT_DIR).iterdir()] == ["4"]


def test_no_checkpoint_is_written_during_a_non_finite_streak(tmp_path):
    run = tmp_path / "run"
    out = io.StringIO()
    exploding = ["train.steps=12", "optim.lr=1e9", "optim.warmup_steps=0", "checkpoint.every=1",
                 "checkpoint.keep=1", "train.max_nonfinite_streak=4"]  # fmt: skip
    with pytest.raises(NonFiniteLoss):
        _run(run, *exploding, out=out)
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    meta = json.loads((run / "checkpoints" / str(saved[-1]) / "meta" / "metadata").read_text())
    assert meta["nonfinite_streak"] == 0
    assert "not checkpointed: the last 1 update(s) were skipped" in out.getvalue()
