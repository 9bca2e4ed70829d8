"""python -m infir2_jax.generate --model PATH --prompts IN.jsonl --out OUT.jsonl [options]

Samples completions for every prompt of IN.jsonl (lines with `input_ids`, `prompt` or
`messages`) from an HF directory or an Orbax checkpoint / run directory, and writes one line
per sample to OUT.jsonl, in input order: {"index", "sample", "output_ids", "text",
"logprobs", "finish_reason"}. `--set model.dtype=float32` runs in FP32,
`--set fp8.recipe=blockwise` with block-FP8 projections, `--set parallel.tensor=2` splits
heads over two devices (the rest of the devices: data-parallel replicas).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from infir2_jax.cli import MODEL_SET_HELP, USAGE, Exit, add_set, command_parser, run_main

if TYPE_CHECKING:
    from infir2_jax.generate.engine import Stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("python -m infir2_jax.generate", __doc__)
    p.add_argument("--model", required=True, help="HF directory or Orbax checkpoint / run dir")
    p.add_argument("--prompts", required=True, help="JSONL: input_ids | prompt | messages")
    p.add_argument("--out", required=True, help="JSONL written when every sample is done")
    p.add_argument("--chat", action="store_true", help="a `prompt` is one user turn of a chat")
    p.add_argument("--chat-template", help="built-in name (qwen2.5) or a Jinja file")
    p.add_argument("--tokenizer", help="tokenizer dir, `qwen` or `bytes` (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--min-p", type=float, default=0.0, help="0: off")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--stop-token-ids",
        help="comma-separated ids that end a sample (default: EOS and <|im_end|>)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="decode slots (concurrent samples)")
    p.add_argument("--max-len", type=int, help="KV cache tokens per slot (default: the model's)")
    p.add_argument("--steps-per-call", type=int, default=32, help="decode steps per dispatch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set(p, MODEL_SET_HELP)
    return p.parse_args(argv)


def _write_atomically(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> Stats:
    from infir2_jax.config import ConfigError
    from infir2_jax.generate.loading import find_tokenizer, load_engine, model_config, sections
    from infir2_jax.generate.prompts import read_prompts
    from infir2_jax.generate.sampling import SamplingParams

    tokenizer = find_tokenizer(args.model, args.tokenizer, args.chat_template)
    cfg = model_config(args.model, sections(args.set)["model"])
    max_len = args.max_len or cfg.max_position_embeddings
    prompts = read_prompts(
        args.prompts, tokenizer, chat=args.chat, vocab_size=cfg.vocab_size, max_len=max_len
    )
    stop_ids = None
    if args.stop_token_ids:
        try:
            stop_ids = tuple(int(t) for t in args.stop_token_ids.split(","))
        except ValueError:
            raise ConfigError(f"--stop-token-ids {args.stop_token_ids!r}: expected ids") from None
    try:
        sampling = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, max_new_tokens=args.max_new_tokens, n=args.n, seed=args.seed,
            stop_token_ids=stop_ids, stop=tuple(args.stop),
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if sampling.stop and tokenizer is None:
        raise ConfigError("--stop needs a tokenizer (--tokenizer DIR)")
    out = Path(args.out)
    if not out.parent.is_dir() or out.is_dir():
        raise ConfigError(f"--out {out}: not a file path in an existing directory")
    engine = load_engine(
        args.model, args.set, tokenizer=tokenizer, slots=args.batch_size,
        steps_per_call=args.steps_per_call, max_len=max_len,
    )  # fmt: skip
    start = time.perf_counter()
    results = engine.generate(prompts, sampling, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    _write_atomically(out, [json.dumps(c.to_json()) for per in results for c in per])
    s = engine.stats
    print(
        f"generate: {s.samples} samples, {s.decode_tokens + s.samples} new tokens in "
        f"{seconds:.1f} s (prefill {s.prefill_tokens_per_second:,.0f} tok/s, decode "
        f"{s.decode_tokens_per_second:,.0f} tok/s) -> {out}",
        file=sys.stderr,
    )
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from infir2_jax.checkpoint import CheckpointError
    from infir2_jax.config import ConfigError
    from infir2_jax.data import DataError

    return run_main(
        lambda: run(args),
        Exit((ConfigError, DataError, CheckpointError), USAGE),
        Exit(ValueError, USAGE),  # the engine's checks: slots, heads over tensor, prompt sizes
    )


if __name__ == "__main__":
    sys.exit(main())
