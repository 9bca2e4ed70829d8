"""Hugging Face Qwen2 directory -> FP8 checkpoint in the DeepSeek-V3 block format
(float8_e4m3fn projection weights + float32 `weight_scale_inv` per 128×128 block), the format
SGLang and vLLM load for block-FP8 inference.

    python converters/hf_to_fp8.py --hf-dir Qwen2.5-7B --out Qwen2.5-7B-FP8 \
        [--scale-format fp32|e8m0] [--check-tp 4]
"""

import sys

import _bootstrap

from infir2_jax.checkpoint.fp8_export import export_fp8, max_tensor_parallel
from infir2_jax.checkpoint.hf_io import read_hf_config


def main(argv=None) -> int:
    parser = _bootstrap.parser(__doc__)
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
    code = _bootstrap.run(
        lambda: export_fp8(
            args.hf_dir, args.out, scale_format=args.scale_format, check_tp=args.check_tp
        )
    )
    if code == 0 and args.check_tp is None:
        tp = max_tensor_parallel(read_hf_config(args.hf_dir))
        print(f"note: block-FP8 inference splits evenly up to {tp}-way tensor parallel "
              "(--check-tp N checks a size)", file=sys.stderr)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
