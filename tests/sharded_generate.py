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
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax import from_pretrained  # noqa: E402
from infir2_jax.config import FP8Config, ParallelConfig  # noqa: E402
from infir2_jax.fp8 import make_gemm  # noqa: E402
from infir2_jax.generate import Engine, SamplingParams  # noqa: E402
from infir2_jax.generate.engine import decode_layout  # noqa: E402
from infir2_jax.model import ModelConfig, Qwen2, resolve_plan  # noqa: E402
from infir2_jax.parallel.rules import activation_layout  # noqa: E402


def _fp8_block(layout, prompts) -> dict:
    """fp8_block under tensor 2 × data 4. FP8 rounding makes the forward discontinuous: any
    change in the order of float32 sums (which tensor parallelism makes) flips some roundings,
    and flips propagate. So the sharded prefill logits are compared with one device's against
    the noise floor, one device's own change when every parameter moves by 1e-7 (relative),
    as tests/test_parallel.py does for training; the sharded engine must also run end to end.
    """
    cfg = ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=128, tie_embeddings=False, dtype="float32", init_std=0.05,
    )  # fmt: skip
    fp8 = make_gemm(FP8Config(recipe="blockwise", power_of_two_scales=False))
    graphdef, params = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(0), plan=resolve_plan(cfg, gemm=fp8)))
    # The same model planned for the mesh: blockwise GEMMs per device on its layout.
    on_mesh = resolve_plan(cfg, gemm=fp8, layout=layout)
    sharded_def = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), plan=on_mesh)))[0]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    nudged = jax.tree.unflatten(
        tree,
        [a * (1 + 1e-7 * jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys, strict=True)],
    )
    rows = np.zeros((8, 16), np.int32)
    for r, p in enumerate(prompts[:8]):
        rows[r, : len(p)] = p
    lengths = np.array([len(p) for p in prompts[:8]] + [1] * (8 - len(prompts)), np.int32)

    def prefill(params, rows, lengths):
        return nnx.merge(graphdef, params).prefill(rows, lengths)[0]

    def sharded(params, rows, lengths):
        with activation_layout(layout):
            return nnx.merge(sharded_def, params).prefill(rows, lengths)[0]

    one = jax.jit(prefill)(params, rows, lengths)
    floor = float(jnp.abs(jax.jit(prefill)(nudged, rows, lengths) - one).max())
    diff = float(jnp.abs(jax.jit(sharded)(params, rows, lengths) - one).max())
    engine = Engine(cfg, nnx.to_pure_dict(params), gemm=fp8, slots=8, layout=layout)
    results = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=1))
    return {
        "temperature": "fp8_block",
        "logits": diff,
        "noise_floor": floor,
        "completed": all(len(r[0].output_ids) == 8 for r in results),
    }


def _rl_rollouts_under_context_parallelism(model, prompts) -> dict:
    """RL's JAX rollout engine on a training mesh data 2 × tensor 2 × context 2: the context
    ranks become extra data-parallel slots, the trainer's sharded parameters are resharded to
    the engine (no host copy), and greedy output equals one device's."""
    import dataclasses

    from infir2_jax.config import load_config
    from infir2_jax.rl.rollout import JaxRollout
    from infir2_jax.train.setup import prepare

    sets = ["train.init_from=null", "train.seq_len=64", "train.batch_size=8", "rl.slots=8"]
    sets += ["parallel.data=2", "parallel.tensor=2", "parallel.context=2"]
    cfg = dataclasses.replace(load_config("tiny_rl", sets), model=model.config)
    setup = prepare(cfg)
    params = jax.device_put(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), setup.state_sharding.params
    )
    rollout = JaxRollout(cfg, setup, params, max_len=64)
    rollout.sync(params, 1)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    one = Engine.from_model(model, slots=4).generate(prompts, greedy)
    many = rollout.generate(prompts, greedy)
    mesh = rollout.engine.layout.mesh.shape
    return {
        "temperature": "rl_context",
        "same_ids": all(a[0].output_ids == b[0].output_ids for a, b in zip(one, many, strict=True)),
        "engine_mesh": dict(mesh),
    }


def main(hf_dir: str, out: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    model = from_pretrained(hf_dir, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n).tolist() for n in (3, 7, 12, 5, 9, 4)]
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
    cases.append(_rl_rollouts_under_context_parallelism(model, prompts))
    cases.append(_fp8_block(layout, prompts))
    with open(out, "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
