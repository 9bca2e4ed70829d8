"""The blockwise FP8 kernel alone on a Hopper GPU: correctness against its reference, then
TFLOPS against a BF16 cuBLAS GEMM of the same shape, at 4096³ and at Qwen2.5-7B's projection
GEMMs (fprop [tokens, in]·[in, out], dgrad [tokens, out]·[out, in], wgrad [in, tokens]·
[tokens, out]). Aim (issue: real FP8 on Hopper): kernel ≥ 1.5× BF16 TFLOPS.

    python bench/fp8_kernel.py [--tokens 8192] [--iters 20]

Needs a GPU (the kernel's CPU checks are tests/test_kernel_blockwise_fp8.py). Prints a
Markdown table for BENCHMARKS.md; the max relative error is against the FP32 reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax.fp8.quantize import E4M3, quantize_blocks  # noqa: E402
from infir2_jax.kernels import blockwise_fp8_matmul, blockwise_fp8_matmul_reference  # noqa: E402

B = 128


def shapes(tokens: int) -> dict[str, tuple[int, int, int, str]]:
    """name -> (M, N, K, b scale mode) of out[M, N] = A[M, K] · B[K, N]."""
    out = {"square 4096³": (4096, 4096, 4096, "block")}
    for name, (d_in, d_out) in {"q/o": (3584, 3584), "gate/up": (3584, 18944),
                                "down": (18944, 3584)}.items():  # fmt: skip
        out[f"7B {name} fprop"] = (tokens, d_out, d_in, "block")
        out[f"7B {name} dgrad"] = (tokens, d_in, d_out, "block")
        out[f"7B {name} wgrad"] = (d_in, d_out, tokens, "column")
    return out


def operands(m: int, n: int, k: int, mode: str, key):
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (n, k), jnp.float32)  # K-major B
    a_q, a_s = quantize_blocks(a, (1, B), E4M3, power_of_two=True)
    b_q, b_s = quantize_blocks(b, (B, B) if mode == "block" else (1, B), E4M3, power_of_two=True)
    return (a_q, a_s, b_q, b_s), (a.astype(jnp.bfloat16), b.T.astype(jnp.bfloat16))


def median_seconds(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        began = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("needs a GPU (CPU checks of the kernel: tests/test_kernel_blockwise_fp8.py)")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = [
        "| GEMM | M × N × K | kernel TFLOPS | BF16 cuBLAS TFLOPS | ratio | max rel. error |",
        "|---|---|---|---|---|---|",
    ]
    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    for i, (name, (m, n, k, mode)) in enumerate(shapes(args.tokens).items()):
        fp8_ops, bf16_ops = operands(m, n, k, mode, jax.random.key(i))
        kernel = jax.jit(lambda *o, mode=mode: blockwise_fp8_matmul(*o, b_scale_mode=mode))
        got = np.asarray(kernel(*fp8_ops), np.float32)
        ref = np.asarray(
            blockwise_fp8_matmul_reference(*fp8_ops, b_scale_mode=mode, out_dtype=jnp.float32)
        )
        error = float(np.abs(got - ref).max() / np.abs(ref).max())
        flops = 2.0 * m * n * k
        t_fp8 = median_seconds(kernel, *fp8_ops, iters=args.iters)
        t_bf16 = median_seconds(bf16, *bf16_ops, iters=args.iters)
        rows.append(
            f"| {name} | {m} × {n} × {k} | {flops / t_fp8 / 1e12:.0f} | "
            f"{flops / t_bf16 / 1e12:.0f} | {t_bf16 / t_fp8:.2f}× | {error:.1e} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
