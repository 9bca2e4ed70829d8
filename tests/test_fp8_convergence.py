"""Every FP8 recipe trains the tiny model like BF16: same data and seed, 300 steps, final loss
(mean of the last 20 steps) within 1% of BF16. The same runs as `bench/fp8_curves.py`, whose
table (with a BF16 run of another seed as the yardstick, -0.7%) is in BENCHMARKS.md."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from fp8_curves import RECIPES, final_loss, run_curves  # noqa: E402

SETTINGS = dict(steps=300, batch=16, seq=64, extra=["optim.lr=1e-3", "optim.min_lr=1e-4"])


def test_fp8_recipes_reach_the_bf16_loss_within_one_percent():
    curves = run_curves(RECIPES, control_seed=None, **SETTINGS)
    bf16 = final_loss(curves["none"])
    assert curves["none"][0] > 5.0 and bf16 < 1.2  # it really trained
    for recipe in RECIPES[1:]:
        relative = final_loss(curves[recipe]) / bf16 - 1
        assert abs(relative) <= 0.01, (recipe, relative)
