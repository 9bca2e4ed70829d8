"""launch/rl_sglang.sbatch under stand-in SLURM tools (scontrol, srun, curl on PATH): the node
split, one server per GPU group on the rollout nodes, the health wait, and the trainer's
command with every server's URL."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

# srun logs its arguments on one line and runs a `bash -c` step (the server starter) so its
# inner loop is exercised too; python (only ever reached from that step) logs its GPUs.
FAKES = {
    "scontrol": 'printf "%s\\n" node-a node-b node-c\n',
    "srun": (
        'echo "srun $*" | tr "\\n" " " >> "$FAKE_LOG"; echo >> "$FAKE_LOG"\n'
        'while [ $# -gt 0 ] && [ "$1" != bash ]; do shift; done\n'
        '[ $# -gt 0 ] && exec "$@"\n'
        "exit 0\n"
    ),
    "python": 'echo "python GPUS=$CUDA_VISIBLE_DEVICES $*" >> "$FAKE_LOG"\n',
    # healthy once a server on that port has started (the servers start in the background)
    "curl": (
        'echo "curl $*" >> "$FAKE_LOG"; port=${@: -1}; port=${port##*:}; port=${port%%/*}\n'
        'grep -q -- "--port $port" "$FAKE_LOG"\n'
    ),
}


def _run(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKES.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/bash\n{body}")
        tool.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    shutil.copytree(ROOT / "launch", tmp_path / "repo" / "launch", dirs_exist_ok=True)
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(tmp_path / "repo"),
        "SLURM_JOB_NODELIST": "node-[a-c]",
        "SLURM_JOB_ID": "42",
        "FAKE_LOG": str(log),
        **env,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "rl_sglang.sbatch"), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stdout + result.stderr, log.read_text()


def test_rl_sglang_launcher_starts_servers_then_the_trainer(tmp_path):
    env = {"SGLANG_MODEL": "/models/sft", "SGLANG_TP": "4", "SGLANG_PORT": "31000"}
    status, output, calls = _run(tmp_path, env, "rl_7b_stage1", "--set", "train.steps=5")
    assert status == 0, output
    lines = calls.splitlines()
    (step,) = [line for line in lines if line.startswith("srun") and "bash -c" in line]
    assert "--nodelist=node-a" in step  # one rollout node
    servers = sorted(line for line in lines if line.startswith("python GPUS="))
    assert [line.split()[1] for line in servers] == ["GPUS=0,1,2,3", "GPUS=4,5,6,7"]
    assert all("--tp-size 4" in line and "--model-path /models/sft" in line for line in servers)
    assert sorted(line.split("--port ")[1].split()[0] for line in servers) == ["31000", "31001"]
    urls = ["http://node-a:31000", "http://node-a:31001"]  # 8 GPUs / TP 4
    checked = [line.split()[-1] for line in lines if line.startswith("curl")]
    assert list(dict.fromkeys(checked)) == [f"{u}/health" for u in urls]
    (trainer,) = [line for line in lines if line.startswith("srun") and "infir2_jax.rl" in line]
    assert "--nodes=2 --nodelist=node-b,node-c --ntasks-per-node=8" in trainer
    assert f"rl.rollout.sglang_urls=[{','.join(urls)}]" in trainer
    assert "rl.rollout.weights=fp8_block" in trainer
    assert trainer.rstrip().endswith("--set train.steps=5")  # the user's settings come last and win


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "set SGLANG_MODEL"),
        ({"SGLANG_MODEL": "m", "ROLLOUT_NODES": "3"}, "leave none for training"),
        ({"SGLANG_MODEL": "m", "SGLANG_TP": "3"}, "does not divide the 8 GPUs"),
    ],
)
def test_rl_sglang_launcher_rejects_bad_settings(tmp_path, env, message):
    status, output, _ = _run(tmp_path, env, "rl_7b_stage1")
    assert status != 0 and message in output, output
