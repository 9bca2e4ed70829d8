"""Attention implementations timed on a GPU: forward + backward of one layer's attention over
packed rows, at Qwen2.5-1.5B (12 / 2 heads) and 7B (28 / 4 heads, per device under TP 4 → 7 / 1)
head shapes, 8k and 32k tokens, against the same XLA attention for correctness.

    python bench/attention_gpu.py [--iters 10] [--impls chunked,cudnn,pallas]
    python bench/attention_gpu.py --smoke        # CPU: tiny shapes, pallas interpreted

Rows hold documents of 1–4k tokens (8–32 per row), as packed SFT/CPT rows do. Prints a Markdown
table for BENCHMARKS.md: median ms per forward+backward, attention TFLOPS (causal: half of the
4·T²·heads·d per row, only within documents), and the max error against chunked XLA.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fp8_kernel import median_seconds  # noqa: E402
from infir2_jax.model.attention import attend  # noqa: E402
from infir2_jax.target import local_target  # noqa: E402

SHAPES = {  # name -> (heads, kv_heads, head_dim)
    "1.5B": (12, 2, 128),
    "7B TP4": (7, 1, 128),
}


def packed_segments(rows: int, seq: int, rng: np.random.Generator, smallest: int) -> np.ndarray:
    out = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        start, doc = 0, 1
        while start < seq:
            length = int(rng.integers(smallest, 4 * smallest + 1))
            out[r, start : start + length] = doc
            start, doc = start + length, doc + 1
    return out


def causal_flops(segments: np.ndarray, heads: int, head_dim: int) -> float:
    """Forward + backward FLOPs of attention restricted to each document, causal."""
    total = 0.0
    for row in segments:
        _, counts = np.unique(row, return_counts=True)
        total += float(np.sum(counts.astype(np.float64) ** 2)) / 2
    return 4 * head_dim * heads * total * 3.5  # fwd 2 GEMMs, bwd 5 (2.5× the forward)


def fwd_bwd(run, index, segments, cot, q, k, v):
    """Attention forward and its backward for the cotangent `cot`."""
    out, vjp = jax.vjp(lambda q, k, v: run(q, k, v, index, index, segments, segments), q, k, v)
    return out, vjp(cot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", default="chunked,cudnn,pallas")
    parser.add_argument("--seqs", default="8192,32768")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, pallas only")
    args = parser.parse_args()
    if args.smoke:
        seqs, shapes, impls, smallest = [256], {"tiny": (4, 2, 32)}, ["chunked", "pallas"], 32
    else:
        if jax.default_backend() != "gpu":
            sys.exit("bench/attention_gpu.py times GPU kernels: run it on a GPU (or --smoke)")
        seqs = [int(s) for s in args.seqs.split(",")]
        shapes, impls, smallest = SHAPES, args.impls.split(","), 1024
    rng = np.random.default_rng(0)
    rows = ["| shape | tokens | attention | ms fwd+bwd | TFLOPS | max err vs chunked |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    on_gpu = local_target().is_cuda  # the Pallas kernel compiled, not interpreted
    for name, (heads, kv_heads, d) in shapes.items():
        for seq in seqs:
            segments = packed_segments(1, seq, rng, smallest)
            keys = jax.random.split(jax.random.key(seq), 4)
            q = jax.random.normal(keys[0], (1, seq, heads, d), jnp.bfloat16)
            k, v = (jax.random.normal(kk, (1, seq, kv_heads, d), jnp.bfloat16) for kk in keys[1:3])
            cot = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
            index, seg = jnp.arange(seq, dtype=jnp.int32), jnp.asarray(segments)
            results = {}
            for impl in impls:
                run = functools.partial(
                    attend, implementation=impl, chunk_size=min(1024, seq),
                    max_segments=int(segments.max()) + 1, block=min(128, seq),
                    compiled=on_gpu,
                )  # fmt: skip

                step = jax.jit(functools.partial(fwd_bwd, run, index, seg, cot))
                results[impl] = (step(q, k, v), median_seconds(step, q, k, v, iters=args.iters))
            ref = results.get("chunked", next(iter(results.values())))[0]
            for impl, (value, seconds) in results.items():
                err = max(
                    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(ref), strict=True)
                )
                tflops = causal_flops(segments, heads, d) / seconds / 1e12
                rows.append(f"| {name} | {seq} | {impl} | {seconds * 1e3:.2f} | {tflops:.0f} "
                            f"| {err:.3g} |")  # fmt: skip
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
