"""Two processes × 4 CPU devices (local coordinator) train, and run RL, exactly like one
process × 8."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT

from infir2_jax.parallel.distributed import DistributedError, initialize

STEPS = 3
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.seq_len=64",
    "model.vocab_size=260",  # splits over tensor=2 (the byte tokenizer needs 257)
    "parallel.fsdp=2",
    "parallel.tensor=2",
    "checkpoint.every=1000",
    "data.streams=2",  # the same global batches for 1 and 2 hosts
]


# RL: rollouts on the training mesh (context ranks decoding as data), old and reference
# logprobs gathered from every process, two mini-batches per rollout.
RL_OVERRIDES = [
    "train.steps=2",
    "train.init_from=null",
    "train.batch_size=16",
    "train.seq_len=64",
    "model.num_layers=1",
    "parallel.data=2",
    "parallel.fsdp=2",
    "parallel.context=2",
    "rl.prompts_per_step=8",
    "rl.n=4",
    "rl.max_new_tokens=3",
    "rl.slots=16",
    "rl.eval_every=2",
    "rl.eval_max_prompts=8",
    "rl.mini_batches=2",
    "rl.loss.kl_coef=0.05",
    "checkpoint.every=1000",
]


def _train_cmd(run_dir, module="train", config="tiny_cpt", overrides=OVERRIDES) -> list[str]:
    sets = [a for o in [*overrides, f"train.run_dir={run_dir}"] for a in ("--set", o)]
    return [sys.executable, "-m", f"infir2_jax.{module}", "--config", config, *sets]


def _rl_cmd(run_dir) -> list[str]:
    return _train_cmd(run_dir, "rl", "tiny_rl", RL_OVERRIDES)


def _env(devices: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "INFIR2_"))}
    return {
        **env,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **extra,
    }


def _losses(run_dir, key="loss") -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


def _two_processes(cmd) -> list[str]:
    """Runs `cmd` as 2 processes × 4 devices; their outputs."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(
                4,
                INFIR2_COORDINATOR=f"localhost:{port}",
                INFIR2_NUM_PROCESSES="2",
                INFIR2_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 0/2" in outputs[0] and "process 1/2" in outputs[1]
    return outputs


def test_two_processes_match_one(tmp_path):
    multi = tmp_path / "multi"
    outputs = _two_processes(_train_cmd(multi))
    assert "data2 × fsdp2 × tensor2 × context1 (8 devices, 2 processes)" in outputs[0]

    single = tmp_path / "single"
    r = subprocess.run(_train_cmd(single), cwd=ROOT, env=_env(8), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(8 devices, 1 processes)" in r.stdout

    got, want = _losses(multi), _losses(single)
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=1e-5)


def test_incomplete_explicit_environment_is_an_error():
    with pytest.raises(DistributedError, match="INFIR2_NUM_PROCESSES"):
        initialize({"INFIR2_COORDINATOR": "localhost:1234", "INFIR2_PROCESS_ID": "0"})
    with pytest.raises(DistributedError, match="not in"):
        initialize(
            {
                "INFIR2_COORDINATOR": "localhost:1234",
                "INFIR2_NUM_PROCESSES": "2",
                "INFIR2_PROCESS_ID": "2",
            }
        )
    assert initialize({}) == "single process"
    assert initialize({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}) == "single process"


def test_rl_on_two_processes_matches_one(tmp_path):
    multi = tmp_path / "multi"
    outputs = _two_processes(_rl_cmd(multi))
    assert "data2 × fsdp2 × tensor1 × context2 (8 devices, 2 processes)" in outputs[0]
    single = tmp_path / "single"
    r = subprocess.run(_rl_cmd(single), cwd=ROOT, env=_env(8), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for key in ("reward_mean", "loss", "grad_norm", "kl", "eval_reward"):
        got, want = _losses(multi, key), _losses(single, key)
        assert len(got) == len(want) > 0, key
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), key
