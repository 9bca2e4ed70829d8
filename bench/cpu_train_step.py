"""Train-step throughput on CPU: infir2-jax vs `transformers` Qwen2 in PyTorch, same shapes.

    python bench/cpu_train_step.py [--steps 10] [--batch 4] [--seq 256]

Both run a full step (forward, backward, AdamW update with clipping) in float32 on a small
Qwen2 of identical shapes and weights. Reports the median step time of each, tokens/s and the
ratio. Not a test: numbers depend on the machine; record them in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import traverse_util  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from infir2_jax.config import OptimConfig  # noqa: E402
from infir2_jax.fp8 import Gemm  # noqa: E402
from infir2_jax.model import ExecutionConfig, resolve_plan  # noqa: E402
from infir2_jax.model.parts import split_model  # noqa: E402
from infir2_jax.pretrained import load_params, read_config  # noqa: E402
from infir2_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from infir2_jax.train.state import init_state, make_train_step  # noqa: E402


def _median_step(run_step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _jax_step(directory: Path, cfg, optim, tokens: np.ndarray):
    """(one infir2-jax train step on `tokens`, its compile seconds)."""
    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    plan = resolve_plan(cfg, ExecutionConfig(remat="none"), gemm=Gemm())
    params = traverse_util.unflatten_dict(dict(load_params(directory, cfg)))
    optimizer = make_optimizer(optim, 1000)
    step_fn = jax.jit(
        make_train_step(split_model(cfg, plan), optimizer, learning_rate_schedule(optim, 1000)),
        donate_argnums=0,
    )
    inputs = jax.device_put(
        {
            "input_ids": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(seq), (batch, seq)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "loss_mask": np.ones((batch, seq), np.int32),
        }
    )
    holder = {"state": init_state(params, {}, optimizer)}

    def jax_step() -> None:
        holder["state"], metrics = step_fn(holder["state"], inputs)
        jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    jax_step()
    return jax_step, time.perf_counter() - start


def _torch_step(hf, tokens: np.ndarray):
    """One PyTorch / transformers train step on `tokens`, the same optimizer settings."""
    torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.tensor(tokens[:, :-1])
    labels = torch.tensor(tokens[:, 1:])

    def torch_step() -> None:
        logits = hf(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)

    return torch_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf_cfg = Qwen2Config(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(hf_cfg)
    directory = Path(tempfile.mkdtemp()) / "hf"
    hf.save_pretrained(directory)

    optim = OptimConfig(lr=1e-4, warmup_steps=0, weight_decay=0.1, clip_norm=1.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hf_cfg.vocab_size, size=(args.batch, args.seq + 1))

    cfg = read_config(directory).replace(dtype="float32", param_dtype="float32")
    jax_step, compile_s = _jax_step(directory, cfg, optim, tokens)
    torch_step = _torch_step(hf, tokens)

    # Interleave the two so machine noise hits both alike.
    jax_times, torch_times = [], []
    for _ in range(3):
        jax_times.append(_median_step(jax_step, args.steps))
        torch_times.append(_median_step(torch_step, args.steps))
    t_jax, t_torch = statistics.median(jax_times), statistics.median(torch_times)
    n_tokens = args.batch * args.seq
    print(f"model: {cfg.num_params:,} params, batch {args.batch}x{args.seq}, float32, "
          f"{args.threads} threads, jax {jax.__version__}, torch {torch.__version__}")  # fmt: skip
    print(f"infir2-jax   : {t_jax * 1e3:8.1f} ms/step  {n_tokens / t_jax:9.0f} tok/s "
          f"(compile {compile_s:.1f} s)")  # fmt: skip
    print(f"transformers : {t_torch * 1e3:8.1f} ms/step  {n_tokens / t_torch:9.0f} tok/s")
    print(f"ratio (jax tok/s / torch tok/s): {t_torch / t_jax:.2f}")


if __name__ == "__main__":
    main()
