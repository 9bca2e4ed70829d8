"""Peak host memory (max RSS) of the HF <-> Orbax converters on a full-size preset.

    python bench/converter_memory.py --preset qwen2.5-0.5b [--dtype bfloat16]

Builds a random HF checkpoint with the preset's exact shapes, converts it HF -> Orbax -> HF in
separate processes and reports each one's max RSS next to the parameter bytes, so the peak for
larger presets can be extrapolated (peak ~= baseline + parameters once + largest tensor).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _max_rss_gib(cmd: list[str]) -> float:
    """Peak resident memory of `cmd`, measured by a fresh small parent process (a child
    forked from a large parent would report the parent's pages as its own)."""
    probe = (
        "import resource, subprocess, sys;"
        f"subprocess.run({cmd!r}, check=True, capture_output=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip()) / 1024**2  # KiB -> GiB


_MAKE_HF = """
import sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from infir2_jax.model import preset, to_hf_config
cfg = preset(sys.argv[1])
model = Qwen2ForCausalLM(Qwen2Config(**to_hf_config(cfg))).to(getattr(torch, sys.argv[2]))
model.save_pretrained(sys.argv[3])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    from infir2_jax.model import preset

    cfg = preset(args.preset)
    work = Path(tempfile.mkdtemp())
    hf_dir, orbax_dir, back_dir = work / "hf", work / "orbax", work / "hf2"
    make = [sys.executable, "-c", _MAKE_HF, args.preset, args.dtype, str(hf_dir)]
    subprocess.run(make, check=True, cwd=ROOT, capture_output=True)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    params_gib = cfg.num_params * itemsize / 1024**3
    largest_gib = cfg.vocab_size * cfg.hidden_size * itemsize / 1024**3

    python = sys.executable
    imports = _max_rss_gib([python, "-c", "import infir2_jax.checkpoint.convert"])
    to_orbax = _max_rss_gib(
        [python, "converters/hf_to_orbax.py", "--hf-dir", str(hf_dir), "--out", str(orbax_dir)]
    )
    to_hf = _max_rss_gib(
        [python, "converters/orbax_to_hf.py", "--checkpoint", str(orbax_dir),
         "--out", str(back_dir), "--dtype", args.dtype]
    )  # fmt: skip
    print(f"{args.preset}: {cfg.num_params:,} params in {args.dtype} = {params_gib:.2f} GiB; "
          f"largest tensor {largest_gib:.2f} GiB; imports alone {imports:.2f} GiB")  # fmt: skip
    print(f"hf_to_orbax max RSS: {to_orbax:.2f} GiB")
    print(f"orbax_to_hf max RSS: {to_hf:.2f} GiB")


if __name__ == "__main__":
    main()
