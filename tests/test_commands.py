"""The command lines as a user meets them: installed as console scripts and run from any
directory, `--help` at once and with the defaults, errors that name what to change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from infir2_jax.eval.__main__ import main as eval_main

MAINS = {
    "infir2-train": "infir2_jax.train.__main__:main",
    "infir2-rl": "infir2_jax.rl.__main__:main",
    "infir2-generate": "infir2_jax.generate.__main__:main",
    "infir2-serve": "infir2_jax.serve.__main__:main",
    "infir2-eval": "infir2_jax.eval.__main__:main",
    "infir2-plan": "infir2_jax.plan:main",
    "infir2-hf-to-orbax": "infir2_jax.checkpoint.commands:hf_to_orbax_main",
    "infir2-orbax-to-hf": "infir2_jax.checkpoint.commands:orbax_to_hf_main",
    "infir2-hf-to-fp8": "infir2_jax.checkpoint.commands:hf_to_fp8_main",
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_the_console_scripts_are_the_documented_commands():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {k: v for k, v in scripts.items() if k in MAINS} == MAINS


def test_help_of_every_command_loads_no_jax(tmp_path):
    """`--help` answers before anything heavy is imported (it took ~10 s when the package
    imported JAX first)."""
    calls = "\n".join(
        f"from {target.split(':')[0]} import {target.split(':')[1]} as f\n"
        f"try:\n    f(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code"
        for target in MAINS.values()
    )
    code = f"import sys\n{calls}\nheavy = [m for m in ('jax', 'flax', 'transformers') if m in sys.modules]\nprint('HEAVY', heavy)"  # noqa: E501
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HEAVY []" in r.stdout, r.stdout[-500:]


def test_generate_and_serve_help_show_the_defaults(capsys):
    from infir2_jax.generate.__main__ import parse_args as generate_args
    from infir2_jax.serve.__main__ import parse_args as serve_args

    for parse, shown in [
        (generate_args, ["(default: 256)", "(default: 16)", "0: off (default: 0)"]),
        (serve_args, ["(default: 8000)", "(default: 127.0.0.1)", "(default: 1024)"]),
    ]:
        with pytest.raises(SystemExit):
            parse(["--help"])
        out = capsys.readouterr().out
        for text in shown:
            assert text in " ".join(out.split()), (text, out)
        assert "(default: None)" not in out


def test_converter_help_keeps_its_example_lines(capsys):
    from infir2_jax.checkpoint.commands import hf_to_fp8_main

    with pytest.raises(SystemExit):
        hf_to_fp8_main(["--help"])
    out = capsys.readouterr().out
    assert "--out Qwen2.5-7B-FP8 \\\n        [--scale-format" in out


def test_train_config_defaults_to_tiny_cpt():
    from infir2_jax.cli import command_parser
    from infir2_jax.train.__main__ import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == "tiny_cpt"
    parser = command_parser("x", None)
    from infir2_jax.cli import add_config

    add_config(parser, default=DEFAULT_CONFIG)
    assert parser.parse_args([]).config == "tiny_cpt"


@pytest.mark.skipif(shutil.which("git") is None, reason="pip needs the repository files")
def test_editable_install_runs_from_any_directory(tmp_path):
    """`pip install -e .` (into a venv that sees this interpreter's packages; no download):
    the console scripts exist and find the bundled configs from an unrelated directory."""
    venv = tmp_path / "venv"  # this interpreter's pip installs into it: no ensurepip (~20 s)
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    r = subprocess.run(
        [*pip, "--quiet", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-e", str(ROOT)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for script in MAINS:
        assert (venv / "bin" / script).is_file(), script
    r = subprocess.run(
        [str(venv / "bin" / "infir2-plan"), "--help"],
        cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: infir2-plan")
    check = "from infir2_jax.config import load_config; print(load_config('tiny_sft').data.kind)"
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", check],
        cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "sft"
    assert not any(elsewhere.iterdir())  # nothing written where it ran


def _eval(tmp_path, *extra: str) -> list[str]:
    return [
        "--config", "eval_tiny", "--model", str(tmp_path / "model"),
        "--set", f"eval.run_dir={tmp_path / 'eval'}", *extra,
    ]  # fmt: skip


def test_eval_checks_evalscope_first_and_says_so_once(tmp_path, monkeypatch, capsys):
    """A missing evalscope interpreter is one error, before any export or server start;
    INFIR2_EVALSCOPE_PYTHON names it, `--set eval.evalscope_python` takes precedence."""
    (tmp_path / "model").mkdir()  # not a model: the evalscope check must come first
    monkeypatch.setenv("INFIR2_EVALSCOPE_PYTHON", str(tmp_path / "no-python"))
    started = time.perf_counter()
    assert eval_main(_eval(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    assert f"{tmp_path / 'no-python'} does not exist" in err
    assert "INFIR2_EVALSCOPE_PYTHON" in err and "eval.evalscope_python" in err
    assert not (tmp_path / "eval").exists()  # nothing exported, no run directory
    assert time.perf_counter() - started < 60

    other = tmp_path / "other-python"
    assert eval_main(_eval(tmp_path, "--set", f"eval.evalscope_python={other}")) == 2
    assert f"{other} does not exist" in capsys.readouterr().err


def test_eval_names_an_interpreter_without_evalscope(tmp_path, monkeypatch, capsys):
    (tmp_path / "model").mkdir()
    bare = tmp_path / "bare-python"
    bare.write_text("#!/bin/sh\nexit 1\n")  # runs, but cannot import evalscope
    bare.chmod(0o755)
    monkeypatch.setenv("INFIR2_EVALSCOPE_PYTHON", str(bare))
    assert eval_main(_eval(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    assert f"evalscope is not installed for {bare}" in err
