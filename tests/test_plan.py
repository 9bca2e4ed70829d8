"""The planner compiles the recipe's 7B and 1.5B steps on fake devices and sizes them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT

from infir2_jax.model import preset


def _plan(config: str, *overrides: str) -> str:
    sets = [a for o in overrides for a in ("--set", o)]
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.plan", "--config", config, *sets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _gib(output: str, label: str) -> float:
    return float(re.search(rf"{re.escape(label)}\s+([\d.]+) GiB", output).group(1))


@pytest.mark.parametrize(
    ("config", "model", "tensor", "recipe"),
    [("cpt_7b", "qwen2.5-7b", 4, "blockwise"), ("cpt_1p5b", "qwen2.5-1.5b", 2, "none")],
)
def test_planner_sizes_recipe_runs(config, model, tensor, recipe):
    out = _plan(config, f"fp8.recipe={recipe}", "train.init_from=null")
    n = preset(model).num_params
    assert f"{n / 1e9:.2f} B parameters" in out
    assert f"tensor{tensor}" in out and "rules tensor_sequence" in out
    # FP32 master weights split over tensor ranks (norms are replicated: within 1 %)
    assert _gib(out, "parameters (FP32 master)") == pytest.approx(4 * n / tensor / 2**30, rel=1e-2)
    # Adam: two FP32 moments per weight, split like the weights
    assert _gib(out, "optimizer state") == pytest.approx(
        2 * _gib(out, "parameters (FP32 master)"), rel=1e-2
    )
    temporaries = _gib(out, "temporaries (XLA)")
    assert 0.5 < temporaries < 80
    assert _gib(out, "peak") > temporaries
    assert "GFLOP/token" in out
    assert "projected step time" not in out  # a CPU compile projects no GPU step time


def test_planner_reports_bad_layouts():
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.plan", "--config", "cpt_7b",
         "--set", "parallel.tensor=8", "--set", "train.init_from=null"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2
    assert "model.num_heads=28 does not split over parallel.tensor=8" in r.stderr
