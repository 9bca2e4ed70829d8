"""report.json and report.md from evalscope's per-benchmark reports, beside InfiR2's
published scores where the model size matches (docs/recipe.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infir2_jax.config import EvalConfig

# pass@1 averages, in % (InfiR2-*-Instruct-FP8; RECIPE.md "Published results").
PUBLISHED = {
    "7b": {"aime25": 40.62, "aime24": 55.73, "gpqa_diamond": 45.33, "live_code_bench": 40.31},
    "1.5b": {"aime25": 18.45, "aime24": 17.39, "gpqa_diamond": 29.48, "live_code_bench": 17.10},
}


def read_evalscope_report(work_dir: Path, model_id: str, benchmark: str) -> dict[str, Any]:
    """(metric, score, samples) of evalscope's headline metric for a benchmark."""
    path = work_dir / "reports" / model_id / f"{benchmark}.json"
    if not path.is_file():
        raise FileNotFoundError(f"evalscope wrote no report for {benchmark} ({path})")
    report = json.loads(path.read_text())
    primary = report.get("primary_metric_identity")
    metrics = report["metrics"]
    chosen = next((m for m in metrics if m.get("identity") == primary), metrics[0])
    name = chosen.get("identity", {}).get("name") or chosen.get("name")
    result = {"metric": name, "score": float(chosen["score"]), "samples": int(chosen["num"])}
    pass_at = {
        int(m["identity"]["dimensions"]["k"]): float(m["score"])
        for m in metrics
        if m.get("identity", {}).get("aggregation") == "pass_at_k"
    }
    if pass_at:
        result["pass_at_k"] = {str(k): pass_at[k] for k in sorted(pass_at)}
    return result


MATH_BENCHMARKS = ("gsm8k", "math_500", "aime24", "aime25", "aime26")


def regrade(work_dir: Path, model_id: str, benchmark: str) -> float | None:
    """The mean reward of evalscope's predictions under our own grader (grading.py `math`,
    what RL's periodic evaluation uses), from evalscope's review files; None for benchmarks
    that are not graded as math answers."""
    if benchmark not in MATH_BENCHMARKS:
        return None
    from infir2_jax.grading import MathReward

    grade = MathReward()
    scores = []
    for path in sorted((work_dir / "reviews" / model_id).glob(f"{benchmark}_*.jsonl")):
        for line in path.read_text().splitlines():
            review = json.loads(line)
            target = review["target"]
            label = target[0] if isinstance(target, list) else target
            prediction = review["sample_score"]["score"].get("prediction") or ""
            scores.append(grade(prediction, str(label)))
    return sum(scores) / len(scores) if scores else None


def write_reports(cfg: EvalConfig, results: dict[str, dict[str, Any]], out_dir: Path) -> str:
    """Writes report.json and report.md; returns the markdown table."""
    (out_dir / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    published = PUBLISHED.get(cfg.model_size or "", {})
    header = "| benchmark | metric | score (%) | our grader (%) | pass@k (%) | samples | repeats |"
    rule = "|---|---|---|---|---|---|---|"
    if published:
        header += f" InfiR2-{cfg.model_size.upper()}-FP8 (%) |"
        rule += "---|"
    lines = [header, rule]
    for name, r in results.items():
        ours = "–" if r.get("regraded") is None else f"{100 * r['regraded']:.2f}"
        pass_at = r.get("pass_at_k") or {}
        largest = max(pass_at, key=int) if pass_at else None
        pass_k = f"{100 * pass_at[largest]:.2f} (k={largest})" if largest else "–"
        row = (
            f"| {name} | {r['metric']} | {100 * r['score']:.2f} | {ours} | {pass_k} | "
            f"{r['samples']} | {r['repeats']} |"
        )
        if published:
            row += f" {published[name]:.2f} |" if name in published else " – |"
        lines.append(row)
    table = "\n".join(lines)
    settings = (
        f"engine {cfg.engine}, temperature {cfg.temperature}, top-p {cfg.top_p}, "
        f"max tokens {cfg.max_tokens} (or per benchmark), system prompt "
        f"{cfg.system_prompt!r}; text up to `</think>` removed before grading."
    )
    (out_dir / "report.md").write_text(f"# Evaluation\n\n{table}\n\n{settings}\n")
    return table
