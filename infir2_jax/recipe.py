"""python -m infir2_jax.recipe --config NAME [--set STAGE:section.key=value ...]
[--run-root DIR] [--until STAGE] [--dry-run]

Runs the stages of a recipe in order (InfiR2's: CPT -> decay -> SFT 1 -> SFT 2 -> RL 1 -> RL 2
-> evaluation), each as its own command (`python -m infir2_jax.train|rl|eval` with the stage's
config) in a process of its own, each starting from the previous stage's output:
`train.init_from` (its weights) or, for a stage with `start: resume_from`,
`train.resume_from` (its whole training state, as the CPT decay job); an eval stage
evaluates it (`--model`). A stage whose final checkpoint (step
`train.steps`) or report is there already is skipped; an interrupted one resumes from its
latest checkpoint. At the end: a table of the stages (steps; loss or reward and evaluation
result, each from the stage's start to its end; time). A bad recipe is one `error:` line and
exit status 2 before anything runs; a failed stage ends the recipe with that stage's exit
status.

A recipe file (configs/recipe_1p5b.yaml, recipe_7b.yaml, recipe_tiny.yaml):

  run_root: runs/my_recipe        # optional: stage NAME writes to run_root/NAME
  stages:
    - {name: cpt, config: cpt_7b, set: [train.steps=35000]}
    - {name: decay, config: cpt_7b_decay, start: resume_from}
    - {name: sft, config: sft_7b_stage1}
    - {name: eval, config: eval_recipe_7b}
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal, TextIO

from infir2_jax.cli import USAGE, Exit, add_config, attempt, command_parser
from infir2_jax.config import (
    ConfigError,
    EvalConfig,
    RunConfig,
    config_sections,
    load_config,
    load_eval_config,
    load_file,
)

MODULES = {"train": "infir2_jax.train", "rl": "infir2_jax.rl", "eval": "infir2_jax.eval"}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: a stage config (train, rl or eval) and its overrides."""

    name: str
    config: str
    set: tuple[str, ...] = ()
    # How a training stage starts from the previous stage's run: its weights (`init_from`),
    # or its whole training state — optimizer, step, data position (`resume_from`).
    start: Literal["init_from", "resume_from"] = "init_from"


@dataclasses.dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    run_root: str | None = None  # stage NAME's run directory: run_root/NAME

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: at least one", key="stages")
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            key = f"stages[{i}].name"
            if not name or "/" in name or ":" in name:
                raise ConfigError(f"{key}: {name!r} is not a plain name", key=key)
            if name in names[:i]:
                raise ConfigError(f"{key}: {name!r} names two stages", key=key)

    def stage(self, name: str, what: str) -> int:
        """The index of stage `name` (`what` says where the name came from, for errors)."""
        names = [s.name for s in self.stages]
        if name not in names:
            raise ConfigError(f"{what}: no stage {name!r} (stages: {', '.join(names)})")
        return names.index(name)


@dataclasses.dataclass(frozen=True)
class Planned:
    """A stage resolved: its kind, config (with the chaining applied) and where it writes."""

    stage: Stage
    kind: Literal["train", "rl", "eval"]
    config: RunConfig | EvalConfig
    source: str | None  # the run it starts from (None: its config's own starting point)
    sets: tuple[str, ...]  # the --set assignments that make `config` of the stage's config

    def command(self) -> list[str]:
        """The stage's own command line (`python -m infir2_jax.train|rl|eval ...`)."""
        command = [sys.executable, "-m", MODULES[self.kind], "--config", self.stage.config]
        if self.kind == "eval":
            command += ["--model", str(self.source)]
        return command + [a for s in self.sets for a in ("--set", s)]

    @property
    def run_dir(self) -> Path:
        cfg = self.config
        return Path(cfg.run_dir if isinstance(cfg, EvalConfig) else cfg.train.run_dir)

    def complete(self) -> bool:
        """Whether an earlier invocation finished this stage (its final checkpoint or report)."""
        if isinstance(self.config, EvalConfig):
            return (self.run_dir / "report.json").is_file()
        return (self.run_dir / "checkpoints" / str(self.config.train.steps)).is_dir()


def load_recipe(name: str) -> Recipe:
    return load_file(Recipe, name)


def _stage_kind(stage: Stage, index: int) -> Literal["train", "rl", "eval"]:
    try:
        sections = config_sections(stage.config)
    except ConfigError as e:
        raise ConfigError(f"stages[{index}] ({stage.name}): {e}") from None
    if "eval" in sections:
        return "eval"
    return "rl" if "rl" in sections else "train"


def plan(recipe: Recipe, stage_sets: dict[str, list[str]]) -> list[Planned]:
    """Every stage's config, loaded (and so checked) before anything runs."""
    planned: list[Planned] = []
    for i, stage in enumerate(recipe.stages):
        kind = _stage_kind(stage, i)
        trained = [p for p in planned if p.kind != "eval"]
        source = str(trained[-1].run_dir) if trained else None
        sets: list[str] = []
        if kind == "eval":
            if source is None:
                raise ConfigError(f"stages[{i}] ({stage.name}): an eval stage needs a stage before")
            if recipe.run_root is not None:
                sets.append(f"eval.run_dir={Path(recipe.run_root) / stage.name}")
        else:
            if source is not None and stage.start == "init_from":
                sets += [f"train.init_from={source}", "train.resume_from=null"]
            elif source is not None:
                sets += [
                    f"train.resume_from={Path(source) / 'checkpoints'}",
                    "train.init_from=null",
                ]
            if recipe.run_root is not None:
                sets.append(f"train.run_dir={Path(recipe.run_root) / stage.name}")
        sets += [*stage.set, *stage_sets.get(stage.name, [])]
        try:
            if kind == "eval":
                config: RunConfig | EvalConfig = load_eval_config(stage.config, sets)
            else:
                config = load_config(stage.config, sets)
        except ConfigError as e:
            raise ConfigError(f"stage {stage.name} ({stage.config}): {e}", key=e.key) from None
        planned.append(Planned(stage, kind, config, source, tuple(sets)))
    return planned


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(records) if key in r), None)


def _trend(records: list[dict[str, Any]], key: str, digits: int) -> str:
    """`key` at the start and at the end of a run ("first -> last"): the means of the first
    and of the last quarter of its logged values (one value each for four or fewer), so one
    noisy RL step does not decide which way a stage moved."""
    values = [r[key] for r in records if key in r]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    k = max(1, len(values) // 4)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    return f"{first:.{digits}f} -> {last:.{digits}f}"


def summary(p: Planned) -> dict[str, str]:
    """Steps, loss or reward and evaluation result of a stage — each from the start of the
    stage to its end — from its run directory (so a stage skipped as complete reports as well
    as one run now)."""
    if isinstance(p.config, EvalConfig):
        path = p.run_dir / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        scores = ", ".join(f"{name} {100 * r['score']:.1f}%" for name, r in report.items())
        return {"steps": "", "result": "", "eval": scores}
    records = _metrics(p.run_dir)
    step = _last(records, "step")
    result_key, eval_key, digits = (
        ("reward_mean", "eval_reward", 3) if p.kind == "rl" else ("loss", "eval_loss", 4)
    )
    name = result_key.split("_")[0]
    result, score = _trend(records, result_key, digits), _trend(records, eval_key, digits)
    steps = f"{step or 0}/{p.config.train.steps}"
    return {
        "steps": steps,
        "result": f"{name} {result}" if result else "",
        "eval": f"eval {name} {score}" if score else "",
    }


def table(rows: list[dict[str, str]]) -> str:
    columns = ("stage", "config", "status", "steps", "result", "eval", "time")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def _run_stage(p: Planned) -> int:
    """Runs the stage's command in a process of its own (so that a GPU's memory is free again
    for the next stage, and an evaluation's server); returns its exit status. A SIGTERM (a
    pre-emption) is passed on: the stage saves its step and exits 143."""
    child = subprocess.Popen(p.command())
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_recipe(
    planned: list[Planned], until: int, out: TextIO | None = None
) -> tuple[int, list[dict[str, str]]]:
    """Runs (or skips, when complete) stages 0..until, stopping at a failed one; returns the
    exit status (0, or the failed stage's) and the table's rows."""
    out = out or sys.stdout
    rows, status = [], 0
    for i, p in enumerate(planned):
        row = {"stage": p.stage.name, "config": p.stage.config, "time": ""}
        if i > until or status != 0:
            row["status"] = "not run"
        elif p.complete():
            row["status"] = "complete"
        else:
            row["status"] = "resumed" if (p.run_dir / "checkpoints").is_dir() else "ran"
            print(
                f"== stage {i + 1}/{len(planned)}: {p.stage.name} ({p.kind}, {p.stage.config}) "
                f"from {p.source or 'its config'} -> {p.run_dir}",
                file=out,
                flush=True,
            )
            started = time.perf_counter()
            status = _run_stage(p)
            row["time"] = f"{time.perf_counter() - started:.0f}s"
            if status != 0:
                row["status"] = f"failed ({status})"
        rows.append({**row, **summary(p)})
    return status, rows


def _stage_sets(recipe: Recipe, assignments: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for assignment in assignments:
        name, sep, setting = assignment.partition(":")
        if not sep or "=" not in setting:
            raise ConfigError(f"--set expects STAGE:section.key=value, got {assignment!r}")
        recipe.stage(name, f"--set {assignment}")
        out.setdefault(name, []).append(setting)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m infir2_jax.recipe", __doc__, raw_doc=True)
    add_config(parser, help="a recipe: a name in configs/ (recipe_tiny, ...) or a YAML path")
    parser.add_argument(
        "--set", action="append", default=[], metavar="STAGE:SECTION.KEY=VALUE",
        help="override one value of one stage's config (repeatable), e.g. --set sft:train.steps=2",
    )  # fmt: skip
    parser.add_argument("--run-root", help="write stage NAME to DIR/NAME (default: the recipe's)")
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage")
    parser.add_argument(
        "--dry-run", action="store_true", help="print each stage's config and start, run nothing"
    )
    args = parser.parse_args(argv)

    def job() -> int:
        recipe = load_recipe(args.config)
        if args.run_root is not None:
            recipe = dataclasses.replace(recipe, run_root=args.run_root)
        until = len(recipe.stages) - 1
        if args.until is not None:
            until = recipe.stage(args.until, "--until")
        planned = plan(recipe, _stage_sets(recipe, args.set))
        if args.dry_run:
            for p in planned:
                state = "complete" if p.complete() else "to run"
                print(
                    f"{p.stage.name}: {p.kind} {p.stage.config} from {p.source or 'its config'} "
                    f"({p.stage.start if p.kind != 'eval' else 'model'}) -> {p.run_dir} [{state}]"
                )
            return 0
        status, rows = run_recipe(planned, until)
        print(f"\nrecipe {args.config}:\n{table(rows)}", flush=True)
        return status

    status, stage_status = attempt(job, Exit(ConfigError, USAGE))
    return status or stage_status or 0


if __name__ == "__main__":
    sys.exit(main())
