"""python -m infir2_jax.eval --config NAME --model PATH [--engine sglang|jax|url] [--url URL]
[--set eval.key=value ...]

Evaluates a model (HF directory, Orbax checkpoint or run directory: its latest checkpoint,
exported to HF first) with evalscope in service mode: starts the inference server (`sglang`,
or `jax`: `python -m infir2_jax.serve`), or uses one at `--url`; runs each benchmark of the
config with its settings; writes evalscope's own outputs under `eval.run_dir/evalscope/`, and
`report.json` and `report.md` (beside InfiR2's published scores) in `eval.run_dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

from infir2_jax.checkpoint import CheckpointError
from infir2_jax.cli import USAGE, Exit, add_config, add_set, command_parser, run_main
from infir2_jax.config import ConfigError, EvalConfig, load_eval_config
from infir2_jax.eval.datasets import dataset_args
from infir2_jax.eval.model import serving_model
from infir2_jax.eval.report import read_evalscope_report, regrade, write_reports
from infir2_jax.eval.servers import ServerError, running_server

TASK_SCRIPT = Path(__file__).with_name("evalscope_task.py")


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


def _task_spec(cfg: EvalConfig, benchmark, base_url: str, work_dir: Path, data_dir: Path):
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
    spec_path.write_text(json.dumps(spec, indent=2))
    python = cfg.evalscope_python or sys.executable
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
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.engine != "url" and not model:
        raise ConfigError(f"--model is needed to start the {cfg.engine} server")
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
