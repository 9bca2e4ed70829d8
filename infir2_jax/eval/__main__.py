"""python -m infir2_jax.eval --config NAME --model PATH [--engine sglang|jax|url] [--url URL]
[--set eval.key=value ...]

Evaluates a model (HF directory, Orbax checkpoint or run directory: its latest checkpoint,
exported to HF first) with evalscope in service mode: starts the inference server (`sglang`,
or `jax`: `python -m infir2_jax.serve`), or uses one at `--url`; runs each benchmark of the
config with its settings; writes evalscope's own outputs under `eval.run_dir/evalscope/`, and
`report.json` and `report.md` (beside InfiR2's published scores) in `eval.run_dir`.

evalscope runs under `eval.evalscope_python`, else the interpreter INFIR2_EVALSCOPE_PYTHON
names, else this one; it is checked before any model is exported or server started.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from infir2_jax.cli import USAGE, Exit, add_config, add_set, command_parser, run_main

if TYPE_CHECKING:
    from infir2_jax.config import EvalConfig

TASK_SCRIPT = Path(__file__).with_name("evalscope_task.py")
EVALSCOPE_PYTHON_ENV = "INFIR2_EVALSCOPE_PYTHON"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("python -m infir2_jax.eval", __doc__)
    add_config(p)
    p.add_argument("--model", help="HF directory, Orbax checkpoint or run dir (not with url)")
    p.add_argument("--engine", choices=("sglang", "jax", "url"), help="default: the config's")
    p.add_argument("--url", help="engine url: a running OpenAI-compatible server (…/v1)")
    add_set(
        p,
        "override one config value (repeatable), e.g. --set eval.temperature=0",
        metavar="eval.KEY=VALUE",
    )
    return p.parse_args(argv)


def evalscope_python(cfg: EvalConfig, environ: dict[str, str] = os.environ) -> str:
    """The interpreter that runs evalscope: `eval.evalscope_python`, else the one
    INFIR2_EVALSCOPE_PYTHON names, else this one."""
    return cfg.evalscope_python or environ.get(EVALSCOPE_PYTHON_ENV) or sys.executable


def check_evalscope(python: str) -> None:
    """A ConfigError unless `python` runs and can import evalscope (found, not imported:
    this takes well under a second)."""
    from infir2_jax.config import ConfigError

    fix = (
        f"install it there (pip install -r requirements-eval.txt) or name an interpreter that "
        f"has it: {EVALSCOPE_PYTHON_ENV}=PATH or --set eval.evalscope_python=PATH"
    )
    if shutil.which(python) is None:
        raise ConfigError(f"evalscope's interpreter {python} does not exist; {fix}")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('evalscope') is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"evalscope's interpreter {python} does not run ({e}); {fix}") from None
    if found.returncode != 0:
        raise ConfigError(f"evalscope is not installed for {python}; {fix}")


def _task_spec(cfg: EvalConfig, benchmark, base_url: str, work_dir: Path, data_dir: Path):
    from infir2_jax.eval.datasets import dataset_args

    generation = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": benchmark.max_tokens or cfg.max_tokens,
        "timeout": cfg.timeout,
    }
    return {
        "model": cfg.served_model_name,
        "api_url": base_url,
        "api_key": "EMPTY",
        "eval_type": "openai_api",
        "datasets": [benchmark.name],
        "dataset_args": {benchmark.name: dataset_args(benchmark, cfg.system_prompt, data_dir)},
        "generation_config": generation,
        "eval_batch_size": cfg.concurrency,
        "repeats": benchmark.repeats,
        "limit": benchmark.limit,
        "work_dir": str(work_dir),
        "no_timestamp": True,
        "seed": cfg.seed,
        "offline": benchmark.dataset is not None,
    }


def _run_benchmark(cfg: EvalConfig, spec: dict, spec_path: Path, log: Path) -> None:
    from infir2_jax.eval.servers import ServerError

    spec_path.write_text(json.dumps(spec, indent=2))
    python = cfg.evalscope_python or sys.executable  # resolved and checked by `run`
    with open(log, "w") as out:
        process = subprocess.Popen(
            [python, str(TASK_SCRIPT), str(spec_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )  # fmt: skip
        try:
            for line in process.stdout:  # evalscope's progress, shown and kept
                out.write(line)
                print(f"  {line}", end="", flush=True)
            status = process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ServerError(f"evalscope failed (status {status}); the end of {log}:\n{tail}")


def run(cfg: EvalConfig, model: str | None) -> dict:
    from infir2_jax.config import ConfigError

    if cfg.engine != "url" and not model:
        raise ConfigError(f"--model is needed to start the {cfg.engine} server")
    cfg = dataclasses.replace(cfg, evalscope_python=evalscope_python(cfg))
    check_evalscope(cfg.evalscope_python)  # before minutes of export and server start-up
    from infir2_jax.eval.model import serving_model
    from infir2_jax.eval.report import read_evalscope_report, regrade, write_reports
    from infir2_jax.eval.servers import running_server

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = serving_model(model, cfg, run_dir) if cfg.engine != "url" else None
    results = {}
    with running_server(cfg, model_dir, run_dir / f"server-{cfg.engine}.log") as base_url:
        for i, benchmark in enumerate(cfg.benchmarks, start=1):
            work_dir = run_dir / "evalscope" / benchmark.name
            work_dir.mkdir(parents=True, exist_ok=True)
            print(
                f"[{i}/{len(cfg.benchmarks)}] {benchmark.name}: repeats {benchmark.repeats}, "
                f"limit {benchmark.limit or 'all'} (evalscope log: {work_dir / 'evalscope.log'})",
                flush=True,
            )
            spec = _task_spec(cfg, benchmark, base_url, work_dir, run_dir / "datasets")
            _run_benchmark(cfg, spec, work_dir / "task.json", work_dir / "evalscope.log")
            result = read_evalscope_report(work_dir, cfg.served_model_name, benchmark.name)
            ours = regrade(work_dir, cfg.served_model_name, benchmark.name)
            results[benchmark.name] = {**result, "repeats": benchmark.repeats, "regraded": ours}
            print(
                f"[{i}/{len(cfg.benchmarks)}] {benchmark.name}: {result['metric']} "
                f"{100 * result['score']:.2f}% over {result['samples']} samples",
                flush=True,
            )
    table = write_reports(cfg, results, run_dir)
    print(f"\n{table}\n\nreport: {run_dir / 'report.json'}, {run_dir / 'report.md'}")
    return results


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds: the server is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from infir2_jax.checkpoint import CheckpointError
    from infir2_jax.config import ConfigError, load_eval_config
    from infir2_jax.eval.servers import ServerError

    def evaluate() -> None:
        cfg = load_eval_config(args.config, args.set)
        if args.engine or args.url:
            engine = args.engine or "url"
            cfg = dataclasses.replace(cfg, engine=engine, url=args.url or cfg.url)
        run(cfg, args.model)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_main(
            evaluate,
            Exit((ConfigError, CheckpointError, FileNotFoundError, ValueError), USAGE),
            Exit(ServerError, 1),
            Exit(KeyboardInterrupt, 130, message="interrupted: server stopped"),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
