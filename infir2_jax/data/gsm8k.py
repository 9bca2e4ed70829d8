"""GSM8K as training data, offline: chat conversations for SFT, question + worked answer
documents for CPT, from the test set bundled with the package (data/assets/), another bundled
set in its layout (`data.path: arithmetic`, recipe_tiny's multiplication facts) or any JSONL
file in GSM8K's format (`question`, `answer` ending in `#### N`).

Training reads them directly with `data.source: gsm8k` (the tiny SFT demo does). To see the chat
format, or to start a data set of your own from it:

    python -m infir2_jax.data.gsm8k --out data/tiny_sft [--gsm8k FILE] [--tokenizer DIR]

writes `sft.jsonl` ({"messages": [...]} per line: the recipe's system prompt, then one or two
question/answer turns, so multi-turn masking is exercised) and a copy of the tokenizer (default:
the built-in Qwen tokenizer) under `tokenizer/`, which `data.source: jsonl` can train on.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from infir2_jax.cli import USAGE, Exit, attempt, command_parser
from infir2_jax.data.bundled import BUNDLED, bundled_path
from infir2_jax.data.kinds import DataKind
from infir2_jax.data.records import DataError, InMemorySource, JsonlSource, expand_paths
from infir2_jax.data.tokenizer import tokenizer_dir

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def solution_text(answer: str) -> str:
    """GSM8K's worked answer without calculator annotations, ending in \\boxed{...}."""
    work, _, final = answer.rpartition("####")
    work = re.sub(r"<<[^>]*>>", "", work).strip()
    return f"{work}\nThe answer is \\boxed{{{final.strip()}}}."


def problems(path: str | Path | None = None) -> list[dict]:
    """(question, answer) records of a GSM8K-format JSONL file or bundled set ("arithmetic")
    (default: the bundled test set)."""
    path = str(path or "gsm8k_test")
    if path in BUNDLED and not Path(path).exists():
        path = str(bundled_path(path))
    files = expand_paths(path, (".jsonl",), key="gsm8k")
    source = JsonlSource(files, "question")
    records = [source[i] for i in range(len(source))]
    for record in records:
        if not isinstance(record.value.get("answer"), str):
            raise DataError(f"{record.where}: missing field 'answer'")
    return [record.value for record in records]


def conversations(path: str | Path | None = None) -> list[dict]:
    """{"messages": [...]} conversations: the system prompt, then one problem, or two for every
    third conversation (multi-turn)."""
    rows = problems(path)
    out, i = [], 0
    while i < len(rows):
        turns = 2 if i % 3 == 0 and i + 1 < len(rows) else 1
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for row in rows[i : i + turns]:
            messages.append({"role": "user", "content": row["question"]})
            messages.append({"role": "assistant", "content": solution_text(row["answer"])})
        out.append({"messages": messages})
        i += turns
    return out


def gsm8k_source(kind: DataKind, field: str, path: str | None = None) -> InMemorySource:
    """The records of `data.source: gsm8k`: conversations under `field` (sft), or each problem
    and its worked answer as one document under `field` (cpt)."""
    if kind.chat:
        values = [{field: c["messages"]} for c in conversations(path)]
    else:
        values = [{field: f"{r['question']}\n{solution_text(r['answer'])}"} for r in problems(path)]
    return InMemorySource(values, "gsm8k")


def write_tiny_sft(out: str | Path, tokenizer: str | Path | None, gsm8k: str | Path | None = None):
    """Writes `out/sft.jsonl` (and `out/tokenizer/`); everything is read first, so bad input
    leaves no directory behind."""
    rows = conversations(gsm8k)
    source = tokenizer_dir(str(tokenizer)) if tokenizer is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if source is not None:
        shutil.copytree(source, out / "tokenizer", dirs_exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m infir2_jax.data.gsm8k", __doc__, raw_doc=True)
    parser.add_argument("--gsm8k", default=None, help="GSM8K-format JSONL (default: bundled)")
    parser.add_argument("--out", default="data/tiny_sft")
    parser.add_argument("--tokenizer", default="qwen", help="tokenizer to copy ('qwen': built in)")
    args = parser.parse_args(argv)
    status, out = attempt(
        lambda: write_tiny_sft(args.out, args.tokenizer, args.gsm8k), Exit(DataError, USAGE)
    )
    if status == 0:
        print(f"wrote {out / 'sft.jsonl'} and {out / 'tokenizer'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
