"""The generation engine (infir2_jax/generate): KV-cache decode against the full forward and
`transformers` generate, exact log-probabilities, the sampler's distributions, stops, seeds,
continuous batching, tensor × data sharding, block-FP8 numerics, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ROOT, make_hf_model, make_qwen_model

from infir2_jax import from_pretrained
from infir2_jax.config import FP8Config
from infir2_jax.fp8 import make_gemm
from infir2_jax.generate import Engine, SamplingParams, sample
from infir2_jax.generate.__main__ import main as generate_main
from infir2_jax.generate.sampling import TokenFilter
from infir2_jax.model import Qwen2
from infir2_jax.model.kv_cache import KVCache

# Three architectures: GQA untied, MQA tied, MHA untied; head_dim 20 / 12 / 24, every bias
# and weight non-zero (make_hf_model).
CONFIGS = {
    "gqa_untied": dict(),
    "mqa_tied": dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=12, tie_word_embeddings=True
    ),
    "mha_untied": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=24),
}
PROMPT_LENGTHS = (3, 11, 6, 17, 9)  # ragged, and more prompts than slots
NEW_TOKENS = 48


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(directory, **CONFIGS[request.param])
    return hf, from_pretrained(directory, dtype="float32")


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_equals_transformers_and_logprobs_equal_full_forward(hf_pair):
    hf, model = hf_pair
    prompts = _prompts(model.config.vocab_size)
    engine = Engine.from_model(model, slots=4, steps_per_call=16)
    results = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS))
    assert engine.stats.decode_calls > 1 and engine.stats.samples == len(prompts)
    for prompt, (completion,) in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt])
        reference = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):].tolist()  # fmt: skip
        assert completion.output_ids == reference
        assert completion.finish_reason == "length"
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + reference])).logits[0].double()
        full = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
        expected = full.gather(1, torch.tensor(reference)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-5)


@pytest.mark.parametrize("recipe", ["none", "blockwise"])
def test_kv_cache_logits_equal_full_forward_at_every_position(recipe):
    """Prefill of ragged prompts, then decode steps: every next-token distribution equals the
    full forward's, with BF16-policy matmuls or block-FP8 ones (per-token 1×128 activation
    tiles and 128×128 weight blocks quantize a token the same in both passes)."""
    from flax import nnx

    from infir2_jax.model import preset, resolve_plan

    cfg = preset("tiny").replace(dtype="float32", init_std=0.1)
    plan = resolve_plan(cfg, gemm=make_gemm(FP8Config(recipe=recipe)))
    model = Qwen2(cfg, rngs=nnx.Rngs(0), plan=plan)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (3, 24))
    lengths = np.array([5, 9, 12])
    full = np.asarray(model(jnp.asarray(ids)))
    logits, k, v = model.prefill(jnp.asarray(ids[:, :12]), jnp.asarray(lengths))
    tol = 1e-5 if recipe == "none" else 1e-4
    np.testing.assert_allclose(logits, full[np.arange(3), lengths - 1], atol=tol)
    # Rows into slots 2, 0, 3; slot 1 stays empty.
    cache = KVCache.zeros(cfg, 4, 32).insert(k, v, jnp.array([0, 1, 2]), jnp.array([2, 0, 3]))
    slot_rows = np.array([1, 0, 0, 2])  # the row each slot holds (slot 1: a dummy)
    positions = lengths[slot_rows]
    for step in range(10):
        tokens = ids[slot_rows, positions + step]
        logits, cache = model.decode(cache, jnp.asarray(tokens), jnp.asarray(positions + step))
        for slot in (0, 2, 3):
            row = slot_rows[slot]
            np.testing.assert_allclose(logits[slot], full[row, lengths[row] + step], atol=tol)


# ------------------------------------------------------------------------------ the sampler
LOGITS = np.log(np.array([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03, 0.02]))


def _exact(temperature, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The sampling distribution written from the definitions (SGLang's order)."""
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    keep = np.ones_like(p, bool)
    order = np.argsort(-p)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if top_p < 1:
        mass = 0.0
        for i in order:
            if keep[i] and mass >= top_p:
                keep[i] = False
            mass += q[i] if keep[i] else 0.0
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    if min_p:
        keep &= q >= min_p * q.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize(
    "how",
    [
        TokenFilter(1.0, 0, 1.0, 0.0),
        TokenFilter(0.6, 0, 1.0, 0.0),
        TokenFilter(1.0, 3, 1.0, 0.0),
        TokenFilter(1.0, 0, 0.6, 0.0),  # nucleus {0.30, 0.22, 0.16}
        TokenFilter(1.0, 0, 1.0, 0.35),  # min_p: p >= 0.105
        TokenFilter(1.5, 5, 0.7, 0.3),  # all three, top-p on the renormalised top-5
    ],
    ids=lambda h: f"T{h.temperature}-k{h.top_k}-p{h.top_p}-m{h.min_p}",
)
def test_sampled_frequencies_match_the_exact_distribution(how):
    draws = 40_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (draws, LOGITS.size))
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    tokens, logprobs = jax.jit(sample, static_argnums=2)(logits, keys, how)
    freq = np.bincount(np.asarray(tokens), minlength=LOGITS.size) / draws
    exact = _exact(how.temperature, how.top_k, how.top_p, how.min_p)
    # 4.5 sigma of a binomial frequency at p = 0.5 is 0.011; every wrong variant we know of
    # (no renormalisation before top-p, min_p against 1, temperature after top-p) moves some
    # token by more than 0.03 on these logits.
    np.testing.assert_allclose(freq, exact, atol=0.011)
    # Log-probabilities are of the untruncated tempered distribution.
    untruncated = jax.nn.log_softmax(jnp.asarray(LOGITS) / how.temperature)
    np.testing.assert_allclose(logprobs, np.asarray(untruncated)[np.asarray(tokens)], atol=1e-6)


def test_greedy_is_argmax_with_untempered_logprobs():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    tokens, logprobs = sample(
        logits, jax.random.split(jax.random.PRNGKey(0), 5), TokenFilter(0.0, 0, 1.0, 0.0)
    )
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
    np.testing.assert_allclose(logprobs, jnp.max(jax.nn.log_softmax(logits), -1), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(n=0), "n must"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_sampling_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# ------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    make_hf_model(directory)
    return from_pretrained(directory, dtype="float32")


def test_seeds_n_samples_and_slot_independence(small_model):
    prompts = _prompts(small_model.config.vocab_size, (4, 9, 6))
    sampling = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, n=3, seed=7)
    first = Engine.from_model(small_model, slots=4).generate(prompts, sampling)
    again = Engine.from_model(small_model, slots=2, steps_per_call=5).generate(prompts, sampling)
    other = Engine.from_model(small_model, slots=4).generate(
        prompts, SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, n=3, seed=8)
    )

    def ids(results):
        return [[c.output_ids for c in per] for per in results]

    # Same seed -> same samples, whatever the slot count or dispatch size.
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    for i, per in enumerate(first):
        assert [(c.index, c.sample) for c in per] == [(i, 0), (i, 1), (i, 2)]
        assert len({tuple(c.output_ids) for c in per}) == 3  # n samples differ


def test_stop_token_ids_end_a_sample(small_model):
    prompts = _prompts(small_model.config.vocab_size, (5, 8))
    engine = Engine.from_model(small_model, slots=2)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=20))
    stop = greedy[0][0].output_ids[6]  # a token greedy decoding reaches at step 6
    stopped = engine.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=(stop,))
    )
    first = stopped[0][0]
    cut = greedy[0][0].output_ids.index(stop) + 1
    assert first.output_ids == greedy[0][0].output_ids[:cut]  # the stop token is kept
    assert first.logprobs == pytest.approx(greedy[0][0].logprobs[:cut], abs=1e-6)
    assert first.finish_reason == "stop"


def test_cache_length_bounds_the_output(small_model):
    engine = Engine.from_model(small_model, slots=2, max_len=20)
    (completion,) = engine.generate([[1] * 15], SamplingParams(temperature=0, max_new_tokens=50))[0]
    assert len(completion.output_ids) == 5 and completion.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt 0 has 20 tokens"):
        engine.generate([[1] * 20], SamplingParams(max_new_tokens=1))


def test_fp8_block_generation_runs_and_stays_close_to_bf16_policy(small_model):
    """fp8_block: the blockwise recipe's forward (1×128 activations, 128×128 weights, FP32
    scales) samples; its log-probabilities differ from the unquantized ones by FP8 noise."""
    from flax import nnx

    cfg = small_model.config
    params = nnx.to_pure_dict(nnx.state(small_model, nnx.Param))
    prompts = _prompts(cfg.vocab_size, (6, 10))
    sampling = SamplingParams(temperature=0, max_new_tokens=8)
    fp8 = make_gemm(FP8Config(recipe="blockwise", power_of_two_scales=False))
    quantized = Engine(cfg, params, gemm=fp8, slots=2).generate(prompts, sampling)
    plain = Engine(cfg, params, slots=2).generate(prompts, sampling)
    first_q, first_p = quantized[0][0].logprobs[0], plain[0][0].logprobs[0]
    assert first_q != first_p and abs(first_q - first_p) < 0.1


def test_tensor_by_data_sharded_generation_equals_one_device(tmp_path):
    make_hf_model(tmp_path / "hf")
    out = tmp_path / "sharded.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    script = ROOT / "tests" / "sharded_generate.py"
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "hf"), str(out)],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    *cases, rl_context, fp8 = json.loads(out.read_text())
    assert [c["temperature"] for c in cases] == [0.0, 1.0]
    assert rl_context["same_ids"], rl_context
    assert rl_context["engine_mesh"] == {"data": 4, "fsdp": 1, "tensor": 2, "context": 1}
    for case in cases:
        assert case["same_ids"], case
        assert case["logprobs"] < 1e-5, case
        assert case["k_proj"].endswith("(None, None, 'tensor')"), case  # heads split
        assert "'tensor'" in case["cache"] and "'data'" in case["cache"], case
    # fp8_block: within FP8's rounding-flip noise (see tests/sharded_generate.py), a wrong
    # reduction or block would be O(1); and the sharded engine samples end to end.
    assert fp8["temperature"] == "fp8_block" and fp8["completed"], fp8
    assert fp8["logits"] <= 3 * fp8["noise_floor"] < 1.0, fp8


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def qwen_model_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny random model with Qwen2.5's vocabulary and the real Qwen tokenizer beside it."""
    return make_qwen_model(tmp_path_factory.mktemp("qwen"), qwen_tokenizer_dir)


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _run(*args: str) -> int:
    return generate_main(["--no-progress", "--set", "model.dtype=float32", *args])


def test_cli_round_trip(tmp_path, qwen_model_dir):
    from transformers import AutoTokenizer

    prompts = _write(
        tmp_path / "in.jsonl",
        [
            {"prompt": "1 + 1 ="},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"input_ids": [9, 8, 7]},
        ],
    )
    out = tmp_path / "out.jsonl"
    code = _run(
        "--model", str(qwen_model_dir), "--prompts", str(prompts), "--out", str(out),
        "--chat-template", "qwen2.5", "--max-new-tokens", "6", "--n", "2", "--seed", "1",
        "--top-p", "0.95", "--batch-size", "4",
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["index"], x["sample"]) for x in lines] == [
        (i, s) for i in range(3) for s in range(2)
    ]
    tokenizer = AutoTokenizer.from_pretrained(qwen_model_dir)
    for x in lines:
        assert set(x) == {"index", "sample", "output_ids", "text", "logprobs", "finish_reason"}
        assert len(x["output_ids"]) == len(x["logprobs"]) <= 6
        assert x["text"] == tokenizer.decode(x["output_ids"], skip_special_tokens=True)
        assert all(lp <= 0 for lp in x["logprobs"])


def test_cli_stop_string_cuts_text_and_ids(tmp_path, qwen_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_model_dir)
    prompts = _write(tmp_path / "in.jsonl", [{"input_ids": [100, 200, 300]}])
    base = ["--model", str(qwen_model_dir), "--prompts", str(prompts), "--temperature", "0"]
    assert _run(*base, "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "12") == 0
    full = json.loads((tmp_path / "a.jsonl").read_text())
    # A stop string that greedy text reaches: the text of output tokens 3..4.
    stop = tokenizer.decode(full["output_ids"][3:5])
    assert (
        _run(*base, "--out", str(tmp_path / "b.jsonl"), "--max-new-tokens", "12", "--stop", stop)
        == 0
    )
    cut = json.loads((tmp_path / "b.jsonl").read_text())
    assert cut["finish_reason"] == "stop"
    assert stop not in cut["text"] and full["text"].startswith(cut["text"] + stop)
    assert cut["output_ids"] == full["output_ids"][: len(cut["output_ids"])]
    assert stop in tokenizer.decode(cut["output_ids"])
    assert stop not in tokenizer.decode(cut["output_ids"][:-1])


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"input_ids": [1], "prompt": "x"}', "line 2: expected exactly one of"),
        ('{"input_ids": [1, "a"]}', "line 2: 'input_ids' must be a list of integers"),
        ('{"input_ids": [999999]}', "line 2: token id 999999 is outside the vocabulary"),
        ('{"input_ids": ' + json.dumps([5] * 40) + "}", "line 2: the prompt has 40 tokens"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: message 0 needs a role"),
    ],
)
def test_cli_bad_input_names_the_line_and_writes_nothing(
    tmp_path, qwen_model_dir, capsys, line, message
):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"input_ids": [1, 2]}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    code = _run(
        "--model",
        str(qwen_model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-len",
        "32",
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [prompts]


def test_cli_text_prompt_without_tokenizer_is_an_error(tmp_path, capsys):
    make_hf_model(tmp_path / "hf")  # no tokenizer files
    prompts = _write(tmp_path / "in.jsonl", [{"input_ids": [1]}, {"prompt": "hello"}])
    code = _run(
        "--model",
        str(tmp_path / "hf"),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o.jsonl"),
    )
    assert code == 2
    assert "line 2: a 'prompt' prompt needs a tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_rejects_unknown_settings(tmp_path, capsys):
    make_hf_model(tmp_path / "hf")
    prompts = _write(tmp_path / "in.jsonl", [{"input_ids": [1]}])
    args = [
        "--model",
        str(tmp_path / "hf"),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o"),
    ]
    assert _run(*args, "--set", "train.steps=3") == 2
    assert "--set train.*" in capsys.readouterr().err
    assert _run(*args, "--set", "fp8.recipe=delayed") == 2
    assert "generation takes none or blockwise" in capsys.readouterr().err
    assert _run(*args, "--set", "model.hidden_size=8") == 2
    assert "model.hidden_size: cannot change" in capsys.readouterr().err


def test_cli_reads_hf_and_orbax_checkpoints_alike(tmp_path):
    from infir2_jax.checkpoint.convert import hf_to_orbax

    make_hf_model(tmp_path / "hf")
    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax")
    prompts = _write(tmp_path / "in.jsonl", [{"input_ids": [3, 1, 4, 1, 5]}, {"input_ids": [9, 2]}])
    lines = {}
    for source in ("hf", "orbax"):
        out = tmp_path / f"{source}.jsonl"
        args = ["--model", str(tmp_path / source), "--prompts", str(prompts), "--out", str(out)]
        assert _run(*args, "--temperature", "0.8", "--seed", "5", "--max-new-tokens", "10") == 0
        lines[source] = out.read_text()
    assert lines["hf"] == lines["orbax"]


def test_sampler_logprobs_equal_the_trainers_recomputation(small_model):
    """What RL relies on: the engine's log-probabilities of sampled tokens (temperature 0.8,
    top-p truncation) equal the model's chunked `token_logprobs` over prompt + output at the
    same temperature, the trainer's recomputation."""
    prompts = _prompts(small_model.config.vocab_size, (5, 9))
    sampling = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=16, seed=2)
    results = Engine.from_model(small_model, slots=2).generate(prompts, sampling)
    for prompt, (completion,) in zip(prompts, results, strict=True):
        row = jnp.asarray([prompt + completion.output_ids])
        logprobs, _ = small_model.token_logprobs(row[:, :-1], row[:, 1:], temperature=0.8)
        np.testing.assert_allclose(logprobs[0, len(prompt) - 1 :], completion.logprobs, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "3000000000"], "seed must be in"),
        (["--batch-size", "0"], "slots (0) and steps_per_call"),
        (["--steps-per-call", "0"], "steps_per_call (0)"),
        (["--temperature", "1e-9"], "temperature must be 0"),
        (["--set", "model.dtype=float16x"], "model.dtype must be"),
        (["--set", "parallel.tensor=2"], "parallel"),  # one device: the mesh does not fit
    ],
)
def test_cli_bad_options_exit_2_before_writing(tmp_path, capsys, extra, message):
    make_hf_model(tmp_path / "hf")
    prompts = _write(tmp_path / "in.jsonl", [{"input_ids": [1, 2]}])
    out = tmp_path / "o.jsonl"
    args = ["--model", str(tmp_path / "hf"), "--prompts", str(prompts), "--out", str(out)]
    assert _run(*args, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_bad_files_exit_2(tmp_path, capsys):
    make_hf_model(tmp_path / "hf")
    binary = tmp_path / "in.jsonl"
    binary.write_bytes(b'{"input_ids": [1]}\n\xff\xfe\n')
    args = ["--model", str(tmp_path / "hf"), "--prompts", str(binary)]
    assert _run(*args, "--out", str(tmp_path / "o.jsonl")) == 2
    assert "not UTF-8" in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    ok = _write(tmp_path / "ok.jsonl", [{"input_ids": [1]}])
    args = ["--model", str(tmp_path / "hf"), "--prompts", str(ok), "--out", str(tmp_path / "dir")]
    assert _run(*args) == 2
    assert "not a file path" in capsys.readouterr().err
    assert list((tmp_path / "dir").iterdir()) == []


def test_cli_on_two_devices_with_tensor_parallelism_equals_one_device(tmp_path):
    make_hf_model(tmp_path / "hf")
    prompts = _write(tmp_path / "in.jsonl", [{"input_ids": [3, 1, 4]}, {"input_ids": [1, 5, 9, 2]}])
    common = [
        "--model", str(tmp_path / "hf"), "--prompts", str(prompts), "--temperature", "0",
        "--max-new-tokens", "12", "--batch-size", "2",
    ]  # fmt: skip
    assert _run(*common, "--out", str(tmp_path / "one.jsonl")) == 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.generate", *common, "--no-progress",
         "--set", "model.dtype=float32", "--set", "parallel.tensor=2",
         "--out", str(tmp_path / "two.jsonl")],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [x["output_ids"] for x in one] == [x["output_ids"] for x in two]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)


def test_stale_cache_entries_never_reach_a_new_sample():
    """A slot reused by a new prompt: whatever an earlier sample left beyond the new one's
    length (here random values) changes nothing, and non-finite K/V are never stored."""
    from flax import nnx

    from infir2_jax.model import preset

    cfg = preset("tiny").replace(dtype="float32")
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 6)))
    _, k, v = model.prefill(ids, jnp.array([6]))
    fresh = KVCache.zeros(cfg, 2, 16)
    stale = KVCache(*(jax.random.normal(jax.random.PRNGKey(i), fresh.k.shape) for i in (1, 2)))
    rows = (jnp.array([0]), jnp.array([1]))
    a, _ = model.decode(fresh.insert(k, v, *rows), jnp.array([3, 3]), jnp.array([0, 6]))
    b, _ = model.decode(stale.insert(k, v, *rows), jnp.array([3, 3]), jnp.array([0, 6]))
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    poisoned = fresh.insert(k.at[0, 0, 2].set(jnp.nan), v.at[0, 0, 3].set(jnp.inf), *rows)
    assert bool(jnp.all(jnp.isfinite(poisoned.k)) & jnp.all(jnp.isfinite(poisoned.v)))
