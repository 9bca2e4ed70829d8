"""Benchmark data for evalscope from local files: the bundled GSM8K test set and AIME 2024
(infir2_jax/data/assets) — or another bundled set in a benchmark's layout (`bundled:NAME`, e.g.
recipe_tiny's `arithmetic` as gsm8k) — written in the layouts evalscope loads from a directory,
and the `dataset_args` that point evalscope at a local copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infir2_jax.config import Benchmark, ConfigError
from infir2_jax.data.bundled import bundled_path

BUNDLED = {"gsm8k": "gsm8k_test", "aime24": "aime24"}  # benchmark -> its own bundled set
LAYOUTS = {"gsm8k": ("gsm8k_test", "arithmetic"), "aime24": ("aime24",)}  # sets in its layout


def _write_bundled(name: str, data: str, out: Path) -> Path:
    """evalscope's layout: a directory whose `test.jsonl` is the test split. GSM8K keeps its
    `question` / `answer` (a worked solution ending `#### N`); AIME its `problem` / `answer`
    (a string, as evalscope requires)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in bundled_path(data).read_text().splitlines()]
    if name == "gsm8k":
        rows = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    else:
        rows = [{"problem": r["problem"], "answer": str(r["answer"])} for r in rows]
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def dataset_args(benchmark: Benchmark, system_prompt: str | None, data_dir: Path) -> dict:
    """evalscope's `dataset_args` entry for one benchmark."""
    args: dict[str, Any] = {
        # RECIPE: the text up to `</think>` is removed before grading (evalscope already
        # drops a complete <think>…</think> block; this also covers a bare `</think>`).
        "filters": {"remove_until": "</think>"},
    }
    if system_prompt:
        args["system_prompt"] = system_prompt
    source = benchmark.dataset
    if source is not None and (source == "bundled" or source.startswith("bundled:")):
        data = source.partition(":")[2] or BUNDLED.get(benchmark.name)
        if data not in LAYOUTS.get(benchmark.name, ()):
            known = ", ".join(f"{b}: {', '.join(sets)}" for b, sets in LAYOUTS.items())
            raise ConfigError(
                f"benchmark {benchmark.name}: dataset={source}: no such bundled set in its "
                f"layout (known: {known})"
            )
        source = str(_write_bundled(benchmark.name, data, data_dir / benchmark.name))
        if benchmark.name == "gsm8k":  # a plain directory has no `main` subset, nor few-shot
            args.update(subset_list=["default"], few_shot_num=0)
    elif source is not None:
        path = Path(source).resolve()
        if not path.is_dir():  # evalscope would silently fall back to downloading
            raise ConfigError(f"benchmark {benchmark.name}: dataset {source} is not a directory")
        source = str(path)
    if source is not None:
        args["dataset_id"] = source
    if benchmark.pass_at_k:
        # The headline stays the mean over samples (pass@1 averaged, as InfiR2 reports); the
        # runner turns this selector into evalscope's MetricSelector.
        args["aggregation"] = "mean_and_pass_at_k"
        args["primary_metric"] = {"name": "accuracy", "aggregation": "mean"}
    if benchmark.subset:
        args["subset_list"] = [benchmark.subset]
    if benchmark.prompt_template is not None:
        args["prompt_template"] = benchmark.prompt_template
    if benchmark.extra:
        extra = {}
        for item in benchmark.extra:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"benchmark {benchmark.name}: extra {item!r} is not KEY=VALUE")
            extra[key] = value
        args["extra_params"] = extra
    return args
