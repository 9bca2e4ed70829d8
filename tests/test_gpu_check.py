"""bench/gpu_check.py, the first-GPU check, kept from rotting: its --smoke run (the same
script at tiny shapes on the CPU, kernels interpreted) writes both reports, measures every
step, and records injected failures — a raised error and a crashed process — while the later
steps still run; a step out of budget is killed and recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
NUMBERS = {  # per step: figures each ok row must carry, as finite numbers
    "kernel": ("max_rel_error", "kernel_tflops", "bf16_tflops", "fp8_tensor_tflops"),
    "quantize": ("differing_bytes", "kernel_ms", "reference_ms"),
    "attention": ("fwd_ms", "fwd_bwd_ms", "max_err_out", "max_err_grads"),
    "train": ("step_ms", "tokens_per_s", "tflops", "plan_peak_gib", "loss_last"),
    "generate": ("prefill_tokens_per_s", "decode_tokens_per_s", "total_s"),
}


def _check(tmp: Path, *extra: str, timeout: float = 900) -> dict:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp), "--wheels", "", *extra],
        check=True, cwd=ROOT, timeout=timeout, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads((tmp / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    """One smoke run (one train recipe, the cheapest to compile; the code is the same for
    each) with the kernel step's process killed after its rows, as a crash would, and the
    attention step raising after its rows."""
    out = tmp_path_factory.mktemp("gpu_check")
    doc = _check(out, "--recipes", "none", "--fault", "kernel=exit", "--fault", "attention")
    return doc, (out / "gpu_check.md").read_text()


def test_every_step_measures_and_reports(smoke):
    doc, md = smoke
    assert list(doc["steps"]) == ["kernel", "quantize", "attention", "train", "generate"]
    assert doc["versions"]["jax"] and doc["smoke"] is True
    for step, keys in NUMBERS.items():
        rows = [r for p in doc["steps"][step]["units"].values() for r in p["rows"]]
        assert rows and all(r["status"] == "ok" for r in rows), (step, rows)
        for row in rows:
            for key in keys:
                assert isinstance(row[key], float) and row[key] == row[key], (step, key, row)
        assert f"## {step}: " in md and rows[0]["item"] in md
    kernel = doc["steps"]["kernel"]["units"]["kernel"]["rows"][0]
    assert kernel["numerics_ok"] and kernel["max_rel_error"] < 1e-2
    quantize = doc["steps"]["quantize"]["units"]["quantize"]["rows"]
    assert len(quantize) == 3 and all(r["bits_equal"] for r in quantize), quantize
    train = doc["steps"]["train"]["units"]["train"]["rows"][0]
    assert train["item"] == "fp8.recipe=none" and train["loss_finite"]
    assert "tiny_cpt cut to 1 of its 4 layers" in md  # a cut model says so
    assert doc["steps"]["generate"]["units"]["generate"]["rows"][1]["greedy_same_as_bf16"]


def test_failures_are_recorded_and_later_steps_still_run(smoke):
    doc, md = smoke
    kernel = doc["steps"]["kernel"]
    assert kernel["status"] == "crashed"  # its rows kept: a crash loses nothing measured
    assert "exited with status 7" in kernel["units"]["kernel"]["error"]
    attention = doc["steps"]["attention"]
    assert attention["status"] == "failed"
    error = attention["units"]["attention"]["error"]
    assert "Traceback" in error and "injected fault (--fault attention)" in error
    assert doc["steps"]["train"]["status"] == "ok"
    assert doc["steps"]["generate"]["status"] == "ok"
    assert "## kernel: crashed" in md and "injected fault" in md


def test_a_step_out_of_budget_is_killed_and_recorded(tmp_path):
    """A wedged step (`--fault kernel=hang`: it blocks before its rows) is killed when its
    share of the budget is spent, and the report says so."""
    doc = _check(tmp_path, "--steps", "kernel", "--budget", "6", "--fault", "kernel=hang",
                 timeout=120)  # fmt: skip
    part = doc["steps"]["kernel"]["units"]["kernel"]
    assert part["status"] == "timeout" and "killed after" in part["error"]
    assert "## kernel: timeout" in (tmp_path / "gpu_check.md").read_text()


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of distribution `name` whose module holds VALUE = 7."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 7\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for file, text in files.items():
            z.writestr(file, text)
    return path


def test_missing_wheels_are_installed_beside_the_image(tmp_path):
    """Only the wheels of distributions not installed are installed, into a folder of their
    own that the steps' processes import from."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import install_wheels

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpu_check_probe", "0.1")
    (wheels / "numpy-2.0.0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"installed")
    site = tmp_path / "site"
    assert install_wheels(wheels, site) == ["gpu_check_probe-0.1-py3-none-any.whl"]
    out = subprocess.run(
        [sys.executable, "-c", "import gpu_check_probe; print(gpu_check_probe.VALUE)"],
        env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "7"
