"""Sharded vs single-device comparisons, run in a subprocess with 8 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_cases.py OUT.json

For every (rules table, mesh, FP8 recipe) case: one full train step (2 micro-batches, plain
SGD with lr 1 so the parameter change *is* the gradient) on the mesh, against the same step on
one device; plus context-parallel attention against full attention. Writes the measured
differences; tests/test_parallel.py asserts on them.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infir2_jax.config import FP8Config, ParallelConfig  # noqa: E402
from infir2_jax.fp8 import make_gemm  # noqa: E402
from infir2_jax.model import PRESETS, ExecutionConfig, Qwen2, resolve_plan  # noqa: E402
from infir2_jax.model.parts import init_params, split_model  # noqa: E402
from infir2_jax.parallel import activation_layout, make_layout  # noqa: E402
from infir2_jax.train.sharding import jit_train_step, state_shardings  # noqa: E402
from infir2_jax.train.state import _summed_loss_fn, make_train_step, new_state  # noqa: E402

MODEL = PRESETS["tiny"].replace(dtype="float32")
EXECUTION = ExecutionConfig(attention_impl="xla")
BATCH, SEQ, MICRO = 16, 64, 2

CASES = [
    # (rules table, mesh sizes data/fsdp/tensor/context)
    ("fsdp", dict(data=1, fsdp=8, tensor=1, context=1)),
    ("tensor_sequence", dict(data=4, fsdp=1, tensor=2, context=1)),
    ("tensor_sequence_context", dict(data=2, fsdp=1, tensor=2, context=2)),
    ("fsdp_tensor", dict(data=1, fsdp=4, tensor=2, context=1)),
]
RECIPES = ["none", "delayed", "blockwise"]


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of several documents (positions restart, segment ids change) plus padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, MODEL.vocab_size, size=(BATCH, SEQ)).astype(np.int32)
    segments = np.zeros((BATCH, SEQ), np.int32)
    positions = np.zeros((BATCH, SEQ), np.int32)
    for row in range(BATCH):
        cuts = np.sort(rng.choice(np.arange(4, SEQ - 4), size=2, replace=False))
        end = SEQ - int(rng.integers(0, 6))  # trailing padding (segment 0)
        bounds = [0, *cuts, end]
        for doc, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segments[row, a:b] = doc + 1
            positions[row, a:b] = np.arange(b - a)
    labels = np.roll(ids, -1, axis=1)
    loss_mask = (segments > 0) & (np.roll(segments, -1, axis=1) == segments)
    return dict(
        input_ids=ids,
        labels=labels,
        loss_mask=loss_mask.astype(np.float32),
        positions=positions,
        segment_ids=segments,
    )


def one_step(recipe: str, layout, batch):
    """(metrics, new params, new fp8 state) of one train step; layout None: one device."""
    plan = resolve_plan(MODEL, EXECUTION, gemm=make_gemm(FP8Config(recipe=recipe)), layout=layout)
    optimizer = optax.sgd(1.0)
    parts = split_model(MODEL, plan)
    init = functools.partial(new_state, MODEL, 0, plan, optimizer)
    if layout is None:
        state = jax.jit(init)()
        step = jax.jit(make_train_step(parts, optimizer, lambda _: 1.0, MICRO))
    else:
        shardings = state_shardings(layout, parts, optimizer, jax.eval_shape(init))
        state = jax.jit(init, out_shardings=shardings)()
        batch = jax.device_put(batch, layout.batch_sharding())
        step = jit_train_step(layout, shardings, parts, optimizer, lambda _: 1.0, MICRO)
    before = jax.device_get(state.params)  # the state is donated to the sharded step
    updated, metrics = step(state, batch)
    return jax.device_get((metrics, updated.params, updated.fp8, before))


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| over every leaf."""
    num = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in _pairs(a, b))
    den = max(float(np.max(np.abs(np.asarray(y)))) for _, y in _pairs(a, b))
    return num / max(den, 1e-30)


def norm_diff(a, b) -> float:
    """max over leaves of ‖a - b‖ / ‖b‖."""
    return max(
        float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / max(np.linalg.norm(y), 1e-30))
        for x, y in _pairs(a, b)
    )


def _pairs(a, b):
    return zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)


def noise_floor(recipe: str, batch) -> float:
    """How far one device's gradients move when every parameter is perturbed by 1e-7
    (relative, float32 rounding level): the chaos FP8 rounding adds to any reordering of
    float32 sums — sharding reorders them too."""
    plan = resolve_plan(MODEL, EXECUTION, gemm=make_gemm(FP8Config(recipe=recipe)))
    parts = split_model(MODEL, plan)
    params, fp8 = init_params(MODEL, 0, plan)
    probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), parts.probes)
    grad = jax.jit(jax.grad(lambda p: _summed_loss_fn(parts)(p, probes, fp8, batch)[0]))
    key = jax.random.key(1)
    noisy = jax.tree.map(lambda p: p * (1 + 1e-7 * jax.random.normal(key, p.shape)), params)
    return norm_diff(grad(noisy), grad(params))


def compare_gemms() -> list[dict]:
    """One FP8 GEMM (value and both gradients) with x split over tokens and w column- or
    row-parallel, against the unsharded GEMM: the FP8 arithmetic itself (global amaxes,
    scales, blocks) must not depend on the sharding."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("tokens", "tensor"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(512, 256)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(256, 384)) * 0.05, jnp.float32)
    c = jnp.asarray(rng.normal(size=(512, 384)), jnp.float32)
    P = jax.sharding.PartitionSpec
    results = []
    for recipe in ("current", "delayed", "blockwise"):
        gemm = make_gemm(FP8Config(recipe=recipe))
        state = {}
        if gemm.stateful:
            history = jnp.zeros((3, 4), jnp.float32).at[:, 1].set(jnp.array([3.0, 0.2, 1e-3]))
            state = {"fp8_history": history, "fp8_probe": jnp.zeros((2, 3), jnp.float32)}
        loss = lambda x, w, gemm=gemm, state=state: jnp.sum(gemm(x, w, state) * c)  # noqa: E731
        f = jax.jit(jax.value_and_grad(loss, (0, 1)))
        ref = f(x, w)
        for name, w_spec in (("column", P(None, "tensor")), ("row", P("tensor", None))):
            xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("tokens", None)))
            ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, w_spec))
            results.append(dict(recipe=recipe, layout=name, diff=rel_diff(f(xs, ws), ref)))
            print(json.dumps(results[-1]), flush=True)
    return results


def sharded_steps(recipe: str, cases, batch):
    """For each (rules table, mesh sizes) of `cases`: one train step on the mesh against the
    same step on one device. Yields (the differences every recipe has, the mesh's FP8 state,
    the one-device FP8 state)."""
    floor = noise_floor(recipe, batch)
    ref_metrics, ref_params, ref_fp8, ref_init = one_step(recipe, None, batch)
    ref_grads = jax.tree.map(lambda a, b: a - b, ref_init, ref_params)
    for rules, sizes in cases:
        layout = make_layout(ParallelConfig(**sizes, rules=rules))
        metrics, params, fp8, init = one_step(recipe, layout, batch)
        grads = jax.tree.map(lambda a, b: a - b, init, params)
        case = dict(
            rules=rules,
            mesh=sizes,
            recipe=recipe,
            init=rel_diff(init, ref_init),
            loss=abs(float(metrics["loss"]) - float(ref_metrics["loss"]))
            / abs(float(ref_metrics["loss"])),
            grads=norm_diff(grads, ref_grads),
            grads_noise_floor=floor,
        )
        yield case, fp8, ref_fp8


def compare_steps() -> list[dict]:
    batch = packed_batch()
    results = []
    for recipe in RECIPES:
        for case, fp8, ref_fp8 in sharded_steps(recipe, CASES, batch):
            if ref_fp8:
                # amax histories: rows x and w are maxima of forward values; row g
                # (gradients) inherits the FP8 backward's chaos
                case["fp8_forward_amax"] = rel_diff(
                    [h[..., :2, :] for h in jax.tree.leaves(fp8)],
                    [h[..., :2, :] for h in jax.tree.leaves(ref_fp8)],
                )
                case["fp8_grad_amax"] = rel_diff(
                    [h[..., 2, :] for h in jax.tree.leaves(fp8)],
                    [h[..., 2, :] for h in jax.tree.leaves(ref_fp8)],
                )
            else:
                case["fp8_forward_amax"] = case["fp8_grad_amax"] = 0.0
            case["fp8_histories"] = len(jax.tree.leaves(fp8))
            results.append(case)
            print(json.dumps(case), flush=True)
    return results


def compare_context_attention() -> list[dict]:
    """Logits of the model under context parallelism (context 4 × tensor 2, and context 8)
    against the plain XLA forward on one device, packed and unpacked rows, and the parameter
    gradients of the packed rows' logits; the same for the
    Pallas flash-attention kernel (interpreted on the CPU), which also runs under tensor and
    data parallelism alone (tensor 2 × data 4)."""
    batch = packed_batch(1)
    inputs = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    valid = batch["segment_ids"] > 0  # padding rows attend among themselves only
    weights = jax.random.normal(jax.random.key(2), (*valid.shape, MODEL.vocab_size))
    weights = weights * valid[..., None]

    def grads(model):  # d(weighted logits of the real tokens) / d(parameters)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params, *inputs):
            return jnp.sum(nnx.merge(graphdef, params)(*inputs) * weights)

        return jax.grad(loss)(params, *inputs)

    reference = Qwen2(MODEL, rngs=nnx.Rngs(0), plan=resolve_plan(MODEL, EXECUTION))
    ref_packed = reference(*inputs)
    ref_plain = reference(batch["input_ids"])
    ref_grads = jax.jit(grads)(reference)
    context_meshes = [dict(data=1, tensor=2, context=4), dict(data=1, tensor=1, context=8)]
    cases = [("xla", sizes) for sizes in context_meshes] + [
        ("pallas", sizes) for sizes in [*context_meshes, dict(data=4, tensor=2, context=1)]
    ]
    results = []
    for implementation, sizes in cases:
        # attention_block 16: several query and key tiles per row (the kernel's loops)
        execution = ExecutionConfig(attention_impl=implementation, attention_block=16)
        layout = make_layout(ParallelConfig(**sizes))
        plan = resolve_plan(MODEL, execution, layout=layout)
        model = Qwen2(MODEL, rngs=nnx.Rngs(0), plan=plan)  # the same weights as the reference

        @jax.jit
        def forward(ids, positions, segments, layout=layout, model=model):
            with activation_layout(layout):
                return model(ids, positions, segments), model(ids), grads(model)

        packed, plain, sharded_grads = forward(*inputs)
        results.append(
            dict(
                implementation=implementation,
                mesh=sizes,
                packed=float(
                    np.max(np.abs(np.asarray(packed) - np.asarray(ref_packed))[valid])
                    / np.max(np.abs(np.asarray(ref_packed)))
                ),
                plain=rel_diff(plain, ref_plain),
                grads=norm_diff(sharded_grads, ref_grads),
            )
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def loss_collectives() -> list[dict]:
    """Per rules table: the collectives of the compiled loss + gradient, by whether they run
    inside a while loop (once per loss chunk) or outside (once per call), with the shapes they
    move. The unembedding must be gathered and its gradient reduced outside the loop."""
    import re

    from infir2_jax.model.loss import chunked_cross_entropy

    batch, seq, embed, vocab = 8, 64, 64, 512
    results = []
    for rules, sizes in CASES:
        layout = make_layout(ParallelConfig(rules=rules, **sizes), jax.devices())
        specs = {"h": ("batch", "seq", None), "w": ("embed", "vocab"), "y": ("batch", None)}
        shapes = {"h": (batch, seq, embed), "w": (embed, vocab), "y": (batch, seq)}
        dtypes = {"h": jnp.float32, "w": jnp.float32, "y": jnp.int32}
        args = [
            jax.ShapeDtypeStruct(shapes[k], dtypes[k], sharding=layout.sharding(specs[k]))
            for k in ("h", "w", "y")
        ]

        def loss(h, w, y, layout=layout):
            with activation_layout(layout):
                return chunked_cross_entropy(h, w, y, jnp.ones(y.shape), chunk_size=64)[0]

        shardings = (args[0].sharding, args[1].sharding)
        step = jax.jit(jax.grad(loss, (0, 1)), out_shardings=shardings)
        text = step.lower(*args).compile().as_text()
        bodies = {b.lstrip("%") for b in re.findall(r" while\(.*?body=(%?[\w.\-]+)", text)}
        inside, outside, current = [], [], None
        for line in text.splitlines():
            header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
            if header and not line.startswith(" ") and line.rstrip().endswith("{"):
                current = header.group(1)
            op = re.search(r"= (\w+\[[\d,]*\])\S* (all-gather|all-reduce|reduce-scatter)\(", line)
            if op:
                (inside if current in bodies else outside).append(f"{op[2]} {op[1]}")
        results.append(dict(rules=rules, mesh=sizes, inside=inside, outside=outside))
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"
    out = {
        "loss_collectives": loss_collectives(),
        "gemms": compare_gemms(),
        "attention": compare_context_attention(),
        "steps": compare_steps(),
    }
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
