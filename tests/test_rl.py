"""RL building blocks: GRPO advantages, dynamic sampling, the policy loss against a numpy
reference written from its formulas, and the math / exact-integer rewards with their timeouts.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infir2_jax.grading import (
    ExactIntegerReward,
    MathReward,
    RewardPool,
    extract_answer,
    make_reward,
    register_reward,
)
from infir2_jax.rl.advantages import (
    DynamicSampler,
    group_advantages,
    informative,
    overlong_penalty,
)
from infir2_jax.rl.policy_loss import PolicyLossConfig, policy_loss


# ------------------------------------------------------------------------------ advantages
def test_group_advantages_normalise_within_each_group():
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0.5, 1]], np.float32)
    adv = group_advantages(rewards)
    for row, a in zip(rewards, adv, strict=True):
        np.testing.assert_allclose(a, (row - row.mean()) / (row.std() + 1e-6), rtol=1e-5)
    np.testing.assert_array_equal(adv[1], 0)  # all agree: nothing to learn
    plain = group_advantages(rewards, divide_by_std=False)
    np.testing.assert_allclose(plain, rewards - rewards.mean(1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="groups, n >= 2"):
        group_advantages(np.zeros((3, 1)))


def test_dynamic_sampling_drops_uninformative_groups_and_refills():
    sampler = DynamicSampler(target=3)
    sampler.offer(["a", "b", "c"], [[1, 1], [0, 1], [0, 0]])  # only b is informative
    assert sampler.needs_more and sampler.kept == ["b"] and sampler.dropped == 2
    sampler.offer(["d", "e"], [[1, 0], [0.5, 0.5]])
    assert sampler.kept == ["b", "d"] and sampler.needs_more
    sampler.offer(["f", "g", "h"], [[0, 1], [1, 0], [1, 1]])  # g is one too many
    assert not sampler.needs_more and sampler.batch() == ["b", "d", "f"]
    assert (sampler.offered, sampler.dropped) == (8, 4)
    np.testing.assert_array_equal(informative([[1, 1, 1], [0, 1, 0]]), [False, True])


def test_overlong_penalty_is_dapos_soft_punishment():
    # max 10 tokens, buffer 4: free up to 6, then -1/4 per token, -1 at 10.
    lengths = np.array([[1, 6, 7, 8], [9, 10, 5, 6]])
    expected = np.array([[0, 0, -0.25, -0.5], [-0.75, -1.0, 0, 0]])
    np.testing.assert_allclose(overlong_penalty(lengths, 10, 4), expected)
    np.testing.assert_allclose(overlong_penalty([10], 10, 10), [-1.0])
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty([1], 10, 0)


def test_overlong_filtering_leaves_truncated_samples_out_of_the_batch():
    from infir2_jax.generate import Completion
    from infir2_jax.rl.loop import _Collected, _rollouts
    from infir2_jax.rl.prompts import Prompt

    def completion(s, reason):
        return Completion(0, s, [5, 6], [-0.1, -0.2], reason)

    group = (Prompt((1, 2), "3"), [completion(0, "stop"), completion(1, "length")])
    rewards = np.array([[1.0, 0.0]])
    collected = _Collected([group], rewards, [group], rewards, np.zeros_like(rewards))
    rl = type("RL", (), {"divide_by_std": True, "overlong": "filter"})
    kept, filtered = _rollouts(collected, rl)
    assert filtered == 1 and len(kept) == 1 and kept[0].advantage > 0.99
    rl.overlong = "none"
    kept, filtered = _rollouts(collected, rl)
    assert filtered == 0 and [r.advantage for r in kept] == pytest.approx([1, -1], abs=1e-5)


# ------------------------------------------------------------------------------ policy loss
def _reference(lp, old, adv, mask, sid, n, cfg, rollout=None, ref=None, ent=None):
    """The module docstring's formulas, per token in numpy float64."""
    lp, old, adv = (np.asarray(a, np.float64) for a in (lp, old, adv))
    ratio = np.exp(lp - old)
    surrogate = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    loss = surrogate.copy()
    if cfg.tis_cap is not None and rollout is not None:
        loss *= np.minimum(np.exp(old - rollout), cfg.tis_cap)
    if cfg.kl_coef:
        d = ref - lp
        loss += cfg.kl_coef * (-d if cfg.kl_estimator == "k1" else np.exp(d) - d - 1)
    if cfg.entropy_coef:
        loss -= cfg.entropy_coef * ent
    per_sample = [loss[(sid == s) & (mask > 0)] for s in range(n)]
    per_sample = [x for x in per_sample if x.size]
    if cfg.aggregation == "token_mean":
        return loss[mask > 0].sum() / mask.sum()
    if cfg.aggregation == "seq_mean_token_mean":
        return np.mean([x.mean() for x in per_sample])
    return np.mean([x.sum() for x in per_sample])


def _batch(seed=0, rows=3, seq=12, samples=5):
    rng = np.random.default_rng(seed)
    sid = rng.integers(0, samples, (rows, seq))
    mask = (rng.random((rows, seq)) < 0.7).astype(np.float32)
    old = rng.normal(-2, 0.5, (rows, seq))
    lp = old + rng.normal(0, 0.5, (rows, seq))  # ratios on both sides of both clip bounds
    adv = rng.normal(0, 1, samples)[sid]
    rollout = old + rng.normal(0, 0.6, (rows, seq))
    ref = old + rng.normal(0, 0.2, (rows, seq))
    ent = rng.random((rows, seq)) * 3
    return lp, old, adv, mask, sid, samples, rollout, ref, ent


CONFIGS = [
    PolicyLossConfig(aggregation="token_mean", tis_cap=None),
    PolicyLossConfig(aggregation="seq_mean_token_mean"),
    PolicyLossConfig(aggregation="seq_mean_token_sum", tis_cap=1.5),
    PolicyLossConfig(aggregation="token_mean", kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01),
    PolicyLossConfig(aggregation="seq_mean_token_mean", kl_coef=0.05, kl_estimator="k3"),
]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c.aggregation}-tis{c.tis_cap}-kl{c.kl_coef}"
)
def test_policy_loss_matches_the_formulas(cfg):
    lp, old, adv, mask, sid, n, rollout, ref, ent = _batch()
    total, weight, metrics = policy_loss(
        jnp.asarray(lp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), jnp.asarray(sid),
        n, cfg, rollout_logprobs=jnp.asarray(rollout), ref_logprobs=jnp.asarray(ref),
        entropy=jnp.asarray(ent),
    )  # fmt: skip
    want = _reference(lp, old, adv, mask, sid, n, cfg, rollout, ref, ent)
    np.testing.assert_allclose(total / weight, want, rtol=1e-5)
    ratio = np.exp(lp - old)
    low = ((adv < 0) & (ratio < 1 - cfg.clip_low) & (mask > 0)).sum()
    high = ((adv > 0) & (ratio > 1 + cfg.clip_high) & (mask > 0)).sum()
    assert (metrics["clip_low"], metrics["clip_high"]) == (low, high) and low > 0 and high > 0
    np.testing.assert_allclose(
        metrics["logprob_mismatch"], (np.abs(old - rollout) * mask).sum(), rtol=1e-5
    )
    if cfg.tis_cap is not None:
        raw = np.exp(old - rollout)
        assert metrics["tis_clipped"] == ((raw > cfg.tis_cap) & (mask > 0)).sum() > 0


def test_policy_loss_gradient_is_zero_where_the_clip_binds_and_micro_batches_add_up():
    lp, old, adv, mask, sid, n, rollout, *_ = _batch(seed=3)
    # Packing keeps a sample within one row: ids distinct per row.
    sid = np.arange(3)[:, None] * n + sid
    cfg = PolicyLossConfig(aggregation="seq_mean_token_mean")

    def loss(lp_, rows=slice(None)):
        total, weight, _ = policy_loss(
            lp_[rows], jnp.asarray(old[rows]), jnp.asarray(adv[rows]), jnp.asarray(mask[rows]),
            jnp.asarray(sid[rows]), 3 * n, cfg, rollout_logprobs=jnp.asarray(rollout[rows]),
        )  # fmt: skip
        return total, weight

    grad = jax.grad(lambda x: loss(x)[0])(jnp.asarray(lp))
    ratio = np.exp(lp - old)
    binding = ((adv < 0) & (ratio < 0.8)) | ((adv > 0) & (ratio > 1.28)) | (mask == 0)
    assert np.all(np.asarray(grad)[binding] == 0) and np.any(np.asarray(grad)[~binding] != 0)
    # Rows split into two micro-batches: loss sums and weights add up to the whole batch's.
    (a, wa), (b, wb) = loss(jnp.asarray(lp), slice(0, 1)), loss(jnp.asarray(lp), slice(1, 3))
    whole, w = loss(jnp.asarray(lp))
    np.testing.assert_allclose(a + b, whole, rtol=1e-5)
    assert wa + wb == w


def test_bad_policy_loss_settings_are_named():
    with pytest.raises(ValueError, match="clip_low"):
        PolicyLossConfig(clip_low=1.5)
    with pytest.raises(ValueError, match="tis_cap"):
        PolicyLossConfig(tis_cap=0)


# ------------------------------------------------------------------------------ rewards
MATH_CASES = [
    # (response, label, reward) -- boxed answers, the last box wins
    ("The answer is \\boxed{42}.", "42", 1),
    ("\\boxed{41}", "42", 0),
    ("first \\boxed{3}, then correcting: \\boxed{4}", "4", 1),
    ("first \\boxed{3}, then correcting: \\boxed{4}", "3", 0),
    ("\\fbox{7}", "7", 1),
    # nested braces, fractions, LaTeX
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1),
    ("\\boxed{0.5}", "\\frac12", 1),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),
    ("\\boxed{x^{2}+1}", "x^2-1", 0),
    ("\\boxed{-5}", "-5", 1),
    ("\\boxed{5}", "-5", 0),
    ("\\boxed{1,000}", "1000", 1),
    ("\\boxed{10\\%}", "10", 1),
    ("\\boxed{5\\text{ cm}}", "5", 1),
    ("\\boxed{[1, 2)}", "[1,2)", 1),
    ("\\boxed{\\pi}", "3.14159", 0),
    ("\\boxed{3, 5}", "5, 3", 1),
    # `Answer:` last lines
    ("Work...\nAnswer: 17", "17", 1),
    ("Work...\nAnswer: $\\frac{2}{3}$.", "2/3", 1),
    ("**Answer:** 12", "12", 1),
    ("Final answer: 9", "9", 1),
    ("Answer: 3\nmore text after it\nAnswer: 4", "4", 1),
    # no extractable answer
    ("I think it is 5", "5", 0),
    ("", "5", 0),
    ("\\boxed{}", "5", 0),
    ("\\boxed{12", "12", 0),
    # thinking: only what follows the last </think> counts
    ("<think>maybe \\boxed{1}</think> so \\boxed{2}", "2", 1),
    ("<think>maybe \\boxed{1}</think> so \\boxed{2}", "1", 0),
    ("<think>a</think><think>b \\boxed{2}</think> no box here", "2", 0),
    # pathological sizes are refused quickly, not parsed
    ("\\boxed{" + "9" * 5000 + "}", "9", 0),
    ("\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}", "1", 0),
]


@pytest.mark.parametrize("response, label, reward", MATH_CASES)
def test_math_reward_table(response, label, reward):
    assert MathReward()(response, label) == reward


def test_thinking_required_means_no_think_end_scores_zero():
    required = MathReward(require_thinking=True)
    assert required("\\boxed{2}", "2") == 0
    assert required("<think>x</think>\\boxed{2}", "2") == 1
    assert extract_answer("no think end \\boxed{2}", require_thinking=True) is None


@pytest.mark.parametrize(
    "response, label, reward",
    [
        ("the result is 12", "12", 1),
        ("so 12.", "12", 1),
        ("\\boxed{12} (not 13)", "12", 1),
        ("1,234", "1234", 1),
        ("= -3", "-3", 1),
        ("12 then 13", "12", 0),
        ("no number", "4", 0),
        ("<think>12</think>", "12", 0),
    ],
)
def test_exact_integer_reward(response, label, reward):
    assert ExactIntegerReward()(response, label) == reward


def _slow_grade(response: str, label: str) -> float:
    if response == "hang":
        time.sleep(60)
    if response == "crash":
        raise RuntimeError("grader bug")
    return float(response == label)


def test_reward_pool_scores_timeouts_and_errors_as_zero_and_counts_them():
    with RewardPool(_slow_grade, workers=2, timeout=1.0) as pool:
        start = time.monotonic()
        grades = pool(["1", "hang", "crash", "2", "x"], ["1", "1", "1", "2", "y"])
        assert time.monotonic() - start < 30  # the hung sample waited ~1 s, not 60
        assert grades.scores == [1.0, 0.0, 0.0, 1.0, 0.0]
        assert (grades.timeouts, grades.errors) == (1, 1)
        again = pool(["3"], ["3"])  # the pool still works afterwards
        assert again.scores == [1.0]


def test_reward_pool_grades_math_in_workers():
    with RewardPool(make_reward("math"), workers=2, timeout=20.0) as pool:
        grades = pool(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "4"])
    assert grades.scores == [1.0, 0.0] and grades.timeouts == grades.errors == 0


def test_reward_registry():
    with pytest.raises(ValueError, match="not one of"):
        make_reward("nope")
    register_reward("always_one_for_test", lambda: lambda response, label: 1.0)
    assert make_reward("always_one_for_test")("x", "y") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math", MathReward)


# ------------------------------------------------------------------------------ packing
def test_pack_rollouts_aligns_labels_masks_and_per_token_values():
    from infir2_jax.rl.batch import Rollout, pack_rollouts

    rollouts = [
        Rollout([10, 11, 12], [20, 21], [-0.5, -0.25], 1.0),
        Rollout([30], [40, 41, 42], [-1.0, -2.0, -3.0], -2.0),
        Rollout([50, 51, 52, 53, 54], [60], [-0.1], 0.5),
    ]
    batch = pack_rollouts(rollouts, seq_len=8, row_multiple=2)
    assert batch["input_ids"].shape == (2, 8)  # 4 + 3 + 5 tokens: two rows
    for i, r in enumerate(rollouts):
        where = batch["sample_ids"] == i
        row = int(np.nonzero(where.any(1))[0][0])
        tokens = [*r.prompt, *r.response]
        np.testing.assert_array_equal(batch["input_ids"][where], tokens[:-1])
        np.testing.assert_array_equal(batch["labels"][where], tokens[1:])
        np.testing.assert_array_equal(batch["positions"][where], np.arange(len(tokens) - 1))
        assert len(set(batch["segment_ids"][where])) == 1 and batch["segment_ids"][where][0] > 0
        mask = batch["loss_mask"][row][where[row]]
        np.testing.assert_array_equal(mask, [0] * (len(r.prompt) - 1) + [1] * len(r.response))
        np.testing.assert_allclose(
            batch["rollout_logprobs"][where][mask > 0], r.logprobs, rtol=1e-7
        )
        assert set(batch["advantages"][where][mask > 0]) == {r.advantage}
    assert batch["loss_mask"].sum() == 6 and (batch["sample_ids"] == -1).sum() == 16 - 12
    with pytest.raises(ValueError, match="rollout 0: prompt 3 \\+ response 2 tokens exceed"):
        pack_rollouts(rollouts[:1], seq_len=3)
    with pytest.raises(ValueError, match="rollout 0: 1 logprobs for 2 response tokens"):
        pack_rollouts([Rollout([1], [2, 3], [-1.0], 0.0)], seq_len=8)


def test_one_grpo_step_moves_probability_towards_positive_advantages():
    """Rollouts from the engine, packed, one step of the shared train step with the policy
    objective: samples with positive advantage become more likely, negative ones less; the
    engine's and the trainer's log-probabilities agree (mismatch ~0, TIS weights ~1)."""
    import optax
    from flax import nnx

    from infir2_jax.fp8 import Gemm
    from infir2_jax.generate import Engine, SamplingParams
    from infir2_jax.model import ExecutionConfig, preset, resolve_plan
    from infir2_jax.model.parts import init_params, split_model
    from infir2_jax.rl.batch import Rollout, pack_rollouts
    from infir2_jax.rl.objective import policy_objective
    from infir2_jax.train.state import init_state, make_train_step

    cfg = preset("tiny").replace(dtype="float32", init_std=0.05)
    plan = resolve_plan(cfg, ExecutionConfig(remat="none"), gemm=Gemm())
    params, fp8 = init_params(cfg, 0, plan)
    parts = split_model(cfg, plan)
    engine = Engine(cfg, params, slots=8)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    results = engine.generate(prompts, SamplingParams(temperature=1.0, n=4, max_new_tokens=6))
    rewards = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], np.float32)
    adv = group_advantages(rewards)
    rollouts = [
        Rollout(prompts[i], c.output_ids, c.logprobs, float(adv[i, s]))
        for i, per in enumerate(results)
        for s, c in enumerate(per)
    ]
    batch = pack_rollouts(rollouts, seq_len=32, row_multiple=2)
    loss_fn = policy_objective(PolicyLossConfig(), num_samples=8, temperature=1.0)
    optimizer = optax.sgd(0.5)
    step = jax.jit(make_train_step(parts, optimizer, lambda _: 0.5, 2, loss_fn=loss_fn))
    new_state, metrics = step(init_state(params, fp8, optimizer), batch)
    tokens = float(metrics["tokens"])
    assert tokens == batch["loss_mask"].sum()
    assert float(metrics["logprob_mismatch"]) / tokens < 1e-5  # same model, same numerics
    np.testing.assert_allclose(float(metrics["tis_weight"]) / tokens, 1.0, atol=1e-4)
    assert float(metrics["clip_low"]) == float(metrics["clip_high"]) == 0  # ratio 1
    np.testing.assert_allclose(float(metrics["loss"]), -adv.mean(), atol=1e-4)

    def sample_logprobs(p):
        model = nnx.merge(parts.graphdef, p, parts.fp8, parts.probes)
        lp, _ = model.token_logprobs(
            jnp.asarray(batch["input_ids"]), jnp.asarray(batch["labels"]),
            jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]),
        )  # fmt: skip
        lp = np.asarray(lp) * batch["loss_mask"]
        return np.array([lp[batch["sample_ids"] == i].sum() for i in range(8)])

    moved = sample_logprobs(new_state.params) - sample_logprobs(params)
    flat = adv.reshape(-1)
    assert np.all(moved[flat > 0] > 0) and np.all(moved[flat < 0] < 0), (moved, flat)


# ------------------------------------------------------------------------------ prompt sets
def test_prompt_files_in_dapo_and_question_layouts(tmp_path, qwen_tokenizer_dir):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from infir2_jax.data.records import DataError
    from infir2_jax.data.tokenizer import load_tokenizer
    from infir2_jax.rl.prompts import PromptOrder, load_prompts

    tokenizer = load_tokenizer(str(qwen_tokenizer_dir), "qwen2.5")
    dapo = [
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
         "reward_model": {"ground_truth": str(i + 1), "style": "rule"}}
        for i in range(3)
    ]  # fmt: skip
    rows = dapo * 4 + [{"prompt": [{"role": "user", "content": "x " * 3000}],
                         "reward_model": {"ground_truth": "1"}}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    got = load_prompts(tmp_path / "dapo.parquet", tokenizer, dedupe=True, max_tokens=256)
    assert (len(got), got.duplicates, got.too_long) == (3, 9, 1)
    assert [p.label for p in got.prompts] == ["1", "2", "3"]
    text = tokenizer.decode(list(got.prompts[0].ids))
    assert text.endswith("What is 0 + 1?<|im_end|>\n<|im_start|>assistant\n")
    assert (
        len(load_prompts(tmp_path / "dapo.parquet", tokenizer, dedupe=False, max_tokens=256)) == 12
    )

    aime = load_prompts("aime24", tokenizer, dedupe=True, max_tokens=4096,
                        question_template="{question}\nPut the answer in \\boxed{}.")  # fmt: skip
    assert len(aime) == 30 and all(p.label.isdigit() for p in aime.prompts)
    assert "Put the answer in \\boxed{}.<|im_end|>" in tokenizer.decode(list(aime.prompts[0].ids))
    # GSM8K's layout (recipe_tiny's bundled facts): the label is the number after ####, and
    # the question follows the system prompt given (SFT's).
    facts = load_prompts("arithmetic", tokenizer, dedupe=True, max_tokens=128,
                         system_prompt="Answer in \\boxed{}.")  # fmt: skip
    assert len(facts) == 81 and facts.prompts[6 * 9 + 7].label == "56"
    assert tokenizer.decode(list(facts.prompts[6 * 9 + 7].ids)) == (
        "<|im_start|>system\nAnswer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n"
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "q", "answer": "1"}) + "\n" + json.dumps({"x": 1}) + "\n"
    )
    with pytest.raises(DataError, match="bad.jsonl line 2: expected DAPO's layout"):
        load_prompts(bad, tokenizer, dedupe=True, max_tokens=64)

    order = PromptOrder(5, seed=3)
    first = order.take(7)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]  # an epoch is a permutation
    resumed = PromptOrder(5, seed=3, position=4)
    assert resumed.take(3) == first[4:7]
