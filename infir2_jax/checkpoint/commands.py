"""The converter commands: `infir2-hf-to-orbax`, `infir2-orbax-to-hf`, `infir2-hf-to-fp8`
(console scripts of an installed package), also `python converters/X.py` in a source checkout.

The errors a user can cause (bad paths, mismatched checkpoints) end the command with one
`error: ...` line and exit status 2, not a traceback. Nothing heavy (JAX) is imported before
the arguments are parsed, so `--help` is immediate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from infir2_jax.cli import USAGE, Exit, attempt, command_parser

HF_TO_ORBAX = """Hugging Face Qwen2 directory -> Orbax model checkpoint.

    infir2-hf-to-orbax --hf-dir Qwen2.5-7B --out ckpt/qwen2.5-7b [--dtype auto]
"""

ORBAX_TO_HF = """Orbax checkpoint (converter output, training step, checkpoints/ folder or run
directory) -> Hugging Face directory that `AutoModelForCausalLM.from_pretrained` and SGLang load.

    infir2-orbax-to-hf --checkpoint runs/cpt_7b --out hf/cpt_7b --tokenizer-dir Qwen2.5-7B

Weights are written in bfloat16 by default (as Qwen2.5 is published), also from a training
checkpoint, whose master weights are float32: `--dtype float32` or `--dtype auto` (as stored)
keeps those.
"""

HF_TO_FP8 = """Hugging Face Qwen2 directory -> FP8 checkpoint in the DeepSeek-V3 block format
(float8_e4m3fn projection weights + float32 `weight_scale_inv` per 128×128 block), the format
SGLang and vLLM load for block-FP8 inference.

    infir2-hf-to-fp8 --hf-dir Qwen2.5-7B --out Qwen2.5-7B-FP8 \\
        [--scale-format fp32|e8m0] [--check-tp 4]
"""


def _parser(doc: str) -> argparse.ArgumentParser:
    """A converter's parser: its docstring's examples shown as written, defaults shown."""
    return command_parser(None, doc, raw_doc=True)


def _run(convert: Callable[[], Path]) -> int:
    from infir2_jax.checkpoint.hf_io import CheckpointError

    user_errors = (CheckpointError, FileNotFoundError, FileExistsError, ValueError)
    status, out = attempt(convert, Exit(user_errors, USAGE))
    if status == 0:
        print(f"wrote {out}")
    return status


def hf_to_orbax_main(argv: list[str] | None = None) -> int:
    parser = _parser(HF_TO_ORBAX)
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json + safetensors")
    parser.add_argument("--out", required=True, help="new Orbax checkpoint directory")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="stored parameter dtype (auto: as in the HF files)",
    )
    args = parser.parse_args(argv)
    from infir2_jax.checkpoint.convert import hf_to_orbax

    return _run(lambda: hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype))


def orbax_to_hf_main(argv: list[str] | None = None) -> int:
    parser = _parser(ORBAX_TO_HF)
    parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint or run directory")
    parser.add_argument("--out", required=True, help="new HF directory")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "auto"],
        help="dtype of the weights written (auto: as the checkpoint stores them)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        help="HF directory whose tokenizer, chat template and generation config are copied",
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    args = parser.parse_args(argv)
    from infir2_jax.checkpoint.convert import orbax_to_hf
    from infir2_jax.checkpoint.orbax_io import stored_param_dtype

    def convert() -> Path:
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

    return _run(convert)


def hf_to_fp8_main(argv: list[str] | None = None) -> int:
    parser = _parser(HF_TO_FP8)
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json + safetensors")
    parser.add_argument("--out", required=True, help="new FP8 checkpoint directory")
    parser.add_argument(
        "--scale-format",
        default="fp32",
        choices=["fp32", "e8m0"],
        help="fp32: scale = amax/448 exactly (InfiR2's RL setting); e8m0: its power-of-two ceiling",
    )
    parser.add_argument(
        "--check-tp",
        type=int,
        metavar="N",
        help="fail unless every projection splits into 128-multiples across N inference ranks",
    )
    args = parser.parse_args(argv)
    from infir2_jax.checkpoint.fp8_export import export_fp8, max_tensor_parallel
    from infir2_jax.checkpoint.hf_io import read_hf_config

    code = _run(
        lambda: export_fp8(
            args.hf_dir, args.out, scale_format=args.scale_format, check_tp=args.check_tp
        )
    )
    if code == 0 and args.check_tp is None:
        tp = max_tensor_parallel(read_hf_config(args.hf_dir))
        print(f"note: block-FP8 inference splits evenly up to {tp}-way tensor parallel "
              "(--check-tp N checks a size)", file=sys.stderr)  # fmt: skip
    return code
