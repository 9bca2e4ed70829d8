"""Generation throughput: the infir2-jax engine vs `transformers` `generate`, same model.

    python bench/generate.py [--batch 8] [--prompt 128] [--new 128] [--repeats 3]
    python bench/generate.py --preset qwen2.5-1.5b --batch 64 --prompt 1024 --new 8192 \
        --dtype bfloat16 --no-hf --fp8   # a GPU: BF16 and fp8_block decode tokens/s

Both sample greedily from one random Qwen2 (the same weights, float32 by default), a batch of
equal-length prompts, exactly `--new` tokens each (no stop token). Each side runs once to warm
up (our compilation), then `--repeats` times; medians are reported. Prefill is timed as a
generation of one token; decode tokens/s = batch × (new − 1) / (total − prefill). The greedy
outputs are compared as a sanity check. Not a test: record the numbers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from infir2_jax.config import FP8Config  # noqa: E402
from infir2_jax.fp8 import make_gemm  # noqa: E402
from infir2_jax.generate import Engine, SamplingParams  # noqa: E402
from infir2_jax.model import ModelConfig, Qwen2, preset, to_hf_config  # noqa: E402

# A small model that still does real work per token on a CPU (~30M parameters).
SMALL = ModelConfig(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
    num_kv_heads=2, head_dim=64, tie_embeddings=False, rope_theta=10_000.0,
    max_position_embeddings=4096,
)  # fmt: skip


def _median(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(cfg, params, prompts, new, repeats, gemm, steps_per_call):
    engine = Engine(cfg, params, gemm=gemm, slots=len(prompts), steps_per_call=steps_per_call)
    outputs = {}

    def run(n):
        def go():
            outputs[n] = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n))

        return go

    prefill = _median(run(1), repeats)
    total = _median(run(new), repeats)
    return prefill, total, [r[0].output_ids for r in outputs[new]]


def _hf(cfg, params, prompts, new, repeats):
    import torch
    from flax import traverse_util
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from infir2_jax.checkpoint.hf_mapping import to_hf_tensors

    hf_cfg = {
        k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "torch_dtype")
    }
    model = Qwen2ForCausalLM(Qwen2Config(**hf_cfg)).eval().to(torch.float32)
    flat = traverse_util.flatten_dict(params)
    tensors = {k: torch.from_numpy(v) for k, v in to_hf_tensors(flat, cfg, np.float32)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    ids = torch.tensor(prompts)
    outputs = {}

    def run(n):
        def go():
            with torch.no_grad():
                outputs[n] = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, eos_token_id=None, pad_token_id=0,
                )  # fmt: skip

        return go

    prefill = _median(run(1), repeats)
    total = _median(run(new), repeats)
    return prefill, total, outputs[new][:, len(prompts[0]) :].tolist()


def _report(name, batch, prompt, new, prefill, total):
    decode = batch * (new - 1) / max(total - prefill, 1e-9)
    print(
        f"{name:>10}: prefill {batch * prompt / prefill:10,.0f} tok/s ({prefill * 1e3:7.1f} ms)"
        f" | decode {decode:8,.0f} tok/s | total {total:6.2f} s"
    )
    return batch * prompt / prefill, decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", help="a model preset (default: a ~30M-parameter model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps-per-call", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="skip transformers (large models)")
    p.add_argument("--fp8", action="store_true", help="also time fp8_block (blockwise) GEMMs")
    args = p.parse_args()

    cfg = preset(args.preset) if args.preset else SMALL
    cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype=args.dtype)
    cfg = cfg.replace(
        max_position_embeddings=max(cfg.max_position_embeddings, args.prompt + args.new)
    )
    params = nnx.to_pure_dict(nnx.state(Qwen2(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    print(
        f"{jax.devices()[0].device_kind} | {cfg.num_params / 1e6:,.0f}M params, {args.dtype} | "
        f"batch {args.batch}, prompt {args.prompt}, new {args.new}, greedy"
    )
    bf16 = make_gemm(FP8Config(recipe="none"))
    pre, tot, ours_ids = _ours(
        cfg, params, prompts, args.new, args.repeats, bf16, args.steps_per_call
    )
    ours = _report("infir2-jax", args.batch, args.prompt, args.new, pre, tot)
    if args.fp8:
        fp8 = make_gemm(FP8Config(recipe="blockwise", power_of_two_scales=False))
        pre8, tot8, _ = _ours(
            cfg, params, prompts, args.new, args.repeats, fp8, args.steps_per_call
        )
        _report("fp8_block", args.batch, args.prompt, args.new, pre8, tot8)
    if not args.no_hf:
        pre_h, tot_h, hf_ids = _hf(cfg, params, prompts, args.new, args.repeats)
        hf = _report("HF", args.batch, args.prompt, args.new, pre_h, tot_h)
        same = sum(a == b for a, b in zip(ours_ids, hf_ids, strict=True))
        print(
            f"ratio (ours / HF): prefill {ours[0] / hf[0]:.2f}x, decode {ours[1] / hf[1]:.2f}x, "
            f"end to end {tot_h / tot:.2f}x | greedy outputs identical: {same}/{args.batch}"
        )


if __name__ == "__main__":
    main()
