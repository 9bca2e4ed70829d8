"""Sharded vs single-device generation, run in a subprocess with 8 fake CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/sharded_generate.py HF_DIR OUT.json

Greedy and sampled (top-p, n=2) completions on tensor 2 × data 4 against one device; writes
whether the ids match and the largest logprob difference. Assertions: tests/test_generate.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax import from_pretrained  # noqa: E402
from infir2_jax.config import ParallelConfig  # noqa: E402
from infir2_jax.generate import Engine, SamplingParams  # noqa: E402
from infir2_jax.generate.engine import decode_layout  # noqa: E402


def main(hf_dir: str, out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    model = from_pretrained(hf_dir, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 7, 12, 5, 9, 4)]
    layout = decode_layout(ParallelConfig(data=4, tensor=2))
    cases = []
    for sampling in (
        SamplingParams(temperature=0, max_new_tokens=24),
        SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24, n=2, seed=3),
    ):
        one = Engine.from_model(model, slots=4).generate(prompts, sampling)
        sharded_engine = Engine.from_model(model, slots=8, layout=layout)
        many = sharded_engine.generate(prompts, sampling)
        pairs = [
            (a, b) for xs, ys in zip(one, many, strict=True) for a, b in zip(xs, ys, strict=True)
        ]
        cache_spec = jax.tree.map(
            lambda a: str(a.sharding.spec), sharded_engine.params["layers"]["self_attn"]
        )
        cases.append(
            {
                "temperature": sampling.temperature,
                "same_ids": all(a.output_ids == b.output_ids for a, b in pairs),
                "logprobs": max(
                    float(np.abs(np.subtract(a.logprobs, b.logprobs)).max()) for a, b in pairs
                ),
                "k_proj": cache_spec["k_proj"]["kernel"],
                "cache": str(sharded_engine._empty_state(64)[0].k.sharding.spec),
            }
        )
    with open(out, "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
