"""Pre-tokenize a corpus once into ArrayRecord shards that training reads with no tokenizer.

    python -m infir2_jax.prepare --config cpt_7b --out data/cpt_prepared [--set ...]
    # then train with: --set data.source=prepared --set data.path=data/cpt_prepared

It reads the run config's `data` section (source, path, fields, tokenizer, template, kind) and
writes every document in source order (so `data.split` selects the same documents from the
prepared shards as from the raw files): CPT records are int32 token ids with EOS appended;
SFT records are [2, length] int32 (tokens, assistant loss mask). Over-long SFT samples are
kept whole (truncation or dropping depends on `train.seq_len`, applied when training).
The output directory appears only once complete (written under a temporary name).
"""

from __future__ import annotations

import os
import sys

from infir2_jax.cli import USAGE, Exit, add_config, add_set, attempt, command_parser


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m infir2_jax.prepare", __doc__)
    add_config(parser, help="a run config (its data section)")
    add_set(parser, help=None)
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--docs-per-shard", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    # Imported once the arguments are parsed: `--help` answers without JAX.
    from infir2_jax.checkpoint.hf_io import CheckpointError
    from infir2_jax.config import ConfigError, load_config
    from infir2_jax.data.corpus_shards import prepare
    from infir2_jax.data.records import DataError

    def load_and_prepare():
        run = load_config(args.config, args.set)
        summary = prepare(
            run.data,
            args.out,
            seq_len=run.train.seq_len,
            docs_per_shard=args.docs_per_shard,
            workers=args.workers,
        )
        return run, summary

    status, done = attempt(load_and_prepare, Exit((ConfigError, DataError, CheckpointError), USAGE))
    if status:
        return status
    run, summary = done
    extra = f", {summary['loss_tokens']:,} in the loss" if "loss_tokens" in summary else ""
    print(
        f"prepared {summary['documents']:,} documents, {summary['tokens']:,} tokens{extra} "
        f"in {len(summary['shards'])} shards -> {args.out} ({summary['seconds']} s)"
    )
    if "rows_per_epoch" in summary:
        rows, batch = summary["rows_per_epoch"], run.train.batch_size
        print(
            f"train split: ~{rows:,} packed rows of {summary['seq_len']:,} tokens per epoch = "
            f"{rows / batch:,.1f} steps per epoch at train.batch_size={batch}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
