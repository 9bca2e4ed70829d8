"""FP8 vs BF16 on one GPU at InfiR2's single-GPU setting: Qwen2.5-1.5B, 8k context,
micro-batch 2 (published, Megatron+TE on H100: BF16 2030 ms / 340 TFLOPS, FP8 1590 ms /
376 TFLOPS). Runs every recipe; see bench/fp8_step.py for what is measured.

    python bench/fp8_gpu.py [--steps 10] [--recipes none,delayed,current,rowwise,blockwise]
    (te_current and te_delayed join the default list where TransformerEngine-JAX is installed)
    python bench/fp8_gpu.py --tiny      # the same script at a CPU-sized model
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_step import main  # noqa: E402

if __name__ == "__main__":
    main({"preset": "qwen2.5-1.5b", "seq": 8192, "batch": 2, "steps": 10, "remat": "full"})
