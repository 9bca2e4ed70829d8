"""Hugging Face Qwen2 directory -> Orbax model checkpoint.

python converters/hf_to_orbax.py --hf-dir Qwen2.5-7B --out ckpt/qwen2.5-7b [--dtype auto]
"""

import sys

import _bootstrap

from infir2_jax.checkpoint.convert import hf_to_orbax


def main(argv=None) -> int:
    parser = _bootstrap.parser(__doc__)
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json + safetensors")
    parser.add_argument("--out", required=True, help="new Orbax checkpoint directory")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="stored parameter dtype (auto: as in the HF files)",
    )
    args = parser.parse_args(argv)
    return _bootstrap.run(lambda: hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype))


if __name__ == "__main__":
    sys.exit(main())
