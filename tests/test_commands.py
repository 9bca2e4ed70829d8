"""The command lines as a user meets them: installed as console scripts and run from any
directory, `--help` at once and with the defaults, errors that name what to change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
    "infir2-prepare": "infir2_jax.prepare:main",
    "infir2-recipe": "infir2_jax.recipe:main",
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


# ---- a tiny training run, read back as a user does

TINY = ["train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.log_every=1",
        "checkpoint.every=2", "model.num_layers=1"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """(run directory, its console output) of two tiny_cpt steps."""
    import io

    from infir2_jax.config import load_config
    from infir2_jax.train import train

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    out = io.StringIO()
    train(load_config("tiny_cpt", [*TINY, f"train.run_dir={run_dir}"]), out=out)
    return run_dir, out.getvalue()


def test_done_line_shows_time_final_loss_and_tokens(tiny_run):
    run_dir, out = tiny_run
    done = out.strip().splitlines()[-1]
    last = [line for line in out.splitlines() if line.startswith("step 2/2")][0]
    loss = last.split("| loss ")[1].split(" ")[0]
    assert done.startswith("done: 2 steps in 0m") or done.startswith("done: 2 steps in 1m"), done
    assert f"final loss {loss}" in done
    assert "128 tokens (2×32 per step)" in done  # 2 steps × 2 rows × 32 tokens
    assert str(run_dir / "checkpoints") in done


def test_weights_only_reads_log_no_absl_warning(tiny_run, tmp_path):
    """A training checkpoint read for its weights (orbax_to_hf; also RL init_from and eval's
    export, which call the same restore) says nothing about the optimizer state it skips."""
    run_dir, _ = tiny_run
    r = subprocess.run(
        [sys.executable, str(ROOT / "converters" / "orbax_to_hf.py"), "--checkpoint",
         str(run_dir), "--out", str(tmp_path / "hf"), "--dtype", "auto"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING" not in r.stderr, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("dtype", ["jnp.float32", "np.float32", "jnp.bfloat16", "'bfloat16'"])
def test_from_pretrained_takes_any_dtype_like(tiny_run, dtype):
    import jax
    import jax.numpy as jnp  # noqa: F401  (the parametrized expressions name them)
    import numpy as np  # noqa: F401

    from infir2_jax import from_pretrained

    model = from_pretrained(tiny_run[0], dtype=eval(dtype))
    want = "float32" if "float32" in dtype else "bfloat16"
    kernel = model.embed_tokens.embedding[...]
    assert str(kernel.dtype) == want
    assert model(jnp.zeros((1, 4), jnp.int32)).shape[:2] == (1, 4)
    with pytest.raises(ValueError, match="not a dtype"):
        from_pretrained(tiny_run[0], dtype="fp99")
    del jax


def test_a_failed_set_up_leaves_no_run_directory(tmp_path):
    """train.init_from naming nothing fails after the checkpointer and config.yaml were
    created: the run directory it made is removed again, one that existed is kept."""
    from infir2_jax.config import load_config
    from infir2_jax.train import train

    run_dir = tmp_path / "runs" / "new"
    cfg = load_config(
        "tiny_cpt", [*TINY, f"train.run_dir={run_dir}", f"train.init_from={tmp_path / 'none'}"]
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(cfg)
    assert not run_dir.exists()
    run_dir.mkdir(parents=True)
    (run_dir / "mine.txt").write_text("kept")
    with pytest.raises(FileNotFoundError):
        train(cfg)
    assert (run_dir / "mine.txt").read_text() == "kept"


def test_too_few_devices_names_the_factors_and_overrides(tmp_path):
    """A recipe's TP 4 × CP 2 on one CPU device: one error naming both factors and the
    overrides that run it here; no run directory left behind."""
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.train", "--config", "tiny_cpt",
         "--set", "parallel.tensor=4", "--set", "parallel.context=2",
         "--set", f"train.run_dir={run_dir}"],
        cwd=tmp_path, env={**_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "tensor 4 × context 2 = 8" in r.stderr
    assert "--set parallel.tensor=1 --set parallel.context=1" in r.stderr
    assert not run_dir.exists()


def test_a_missing_model_path_says_it_does_not_exist(tmp_path, capsys):
    from infir2_jax.generate.__main__ import main as generate_main

    (tmp_path / "p.jsonl").write_text('{"input_ids": [1, 2]}\n')
    missing = tmp_path / "runs" / "nothing"
    status = generate_main(
        ["--model", str(missing), "--prompts", str(tmp_path / "p.jsonl"),
         "--out", str(tmp_path / "o.jsonl")]
    )  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err
    assert "not an Orbax" not in err


def test_generate_takes_the_runs_tokenizer_from_its_config(tmp_path, capsys):
    """`--model runs/x` (or its checkpoints/ or a step) of an SFT run: the tokenizer and chat
    template its config.yaml names, without --tokenizer."""
    from infir2_jax.config import dump_config, load_config
    from infir2_jax.generate.loading import find_tokenizer

    run = tmp_path / "runs" / "sft"
    (run / "checkpoints" / "20").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config("tiny_sft")))
    for model in (run, run / "checkpoints", run / "checkpoints" / "20"):
        tokenizer = find_tokenizer(str(model), None, None)
        assert tokenizer is not None and tokenizer.chat_template
        assert "<|im_start|>" in tokenizer.chat_template
    assert f"tokenizer: qwen (from {run / 'config.yaml'})" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    assert find_tokenizer(str(tmp_path / "bare"), None, None) is None
