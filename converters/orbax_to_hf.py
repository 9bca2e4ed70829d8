"""Orbax checkpoint (converter output, training step, checkpoints/ folder or run directory)
-> Hugging Face directory that `AutoModelForCausalLM.from_pretrained` and SGLang load.

    python converters/orbax_to_hf.py --checkpoint runs/cpt_7b --out hf/cpt_7b \\
        --tokenizer-dir Qwen2.5-7B

Weights are written in bfloat16 by default (as Qwen2.5 is published), also from a training
checkpoint, whose master weights are float32: `--dtype float32` or `--dtype auto` (as stored)
keeps those.
"""

import sys

import _bootstrap

from infir2_jax.checkpoint.convert import orbax_to_hf
from infir2_jax.checkpoint.orbax_io import stored_param_dtype


def main(argv=None) -> int:
    parser = _bootstrap.parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint or run directory")
    parser.add_argument("--out", required=True, help="new HF directory")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "auto"],
        help="dtype of the weights written (default bfloat16; auto: as the checkpoint stores them)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        help="HF directory whose tokenizer, chat template and generation config are copied",
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    args = parser.parse_args(argv)

    def convert():
        stored = stored_param_dtype(args.checkpoint)
        if args.dtype not in ("auto", stored):
            print(
                f"note: the checkpoint stores {stored}; writing {args.dtype} "
                "(--dtype auto keeps it)"
            )
        return orbax_to_hf(
            args.checkpoint,
            args.out,
            dtype=args.dtype,
            copy_files_from=args.tokenizer_dir,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
        )

    return _bootstrap.run(convert)


if __name__ == "__main__":
    sys.exit(main())
