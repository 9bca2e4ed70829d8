"""`python -m infir2_jax.rl`: the loop learns (a reward a broken loss would not raise), resumes
exactly, and rejects bad settings by name."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from infir2_jax.config import ConfigError, load_config
from infir2_jax.grading import REWARDS, register_reward
from infir2_jax.rl.loop import run
from infir2_jax.train.stopping import NonFiniteLoss


def _starts_with_digit(response: str, label: str) -> float:
    """A reward a random byte-level model earns now and then (~4% of first tokens)."""
    return float(response[:1].isdigit())


if "starts_with_digit" not in REWARDS:
    register_reward("starts_with_digit", lambda: _starts_with_digit)


def _config(run_dir, steps, **extra):
    sets = {
        "train.run_dir": run_dir,
        "train.init_from": "null",
        "train.steps": steps,
        "train.batch_size": 32,
        "train.seq_len": 64,
        "optim.lr": 1e-2,
        "model.hidden_size": 64,
        "model.intermediate_size": 128,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.num_kv_heads": 1,
        "model.head_dim": 32,
        "rl.reward": "starts_with_digit",
        "rl.prompts_per_step": 16,
        "rl.n": 8,
        "rl.mini_batches": 1,
        "rl.max_new_tokens": 2,
        "rl.dynamic_sampling": "false",
        "rl.eval_every": 0,
        "rl.slots": 64,
        "checkpoint.every": 3,
        "checkpoint.async_save": "false",
        **extra,
    }
    return load_config("tiny_rl", [f"{k}={v}" for k, v in sets.items()])


def test_rl_raises_a_reward_the_model_can_reach(tmp_path):
    history = run(_config(tmp_path / "run", 15), out=io.StringIO())
    rewards = [h["reward_mean"] for h in history]
    assert len(rewards) == 15
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    last = history[-1]
    assert last["logprob_mismatch"] < 1e-4  # engine and trainer agree (float32)
    assert 0.99 < last["tis_weight_mean"] < 1.01
    for key in ("accuracy", "response_length_mean", "entropy", "clip_fraction_high"):
        assert np.isfinite(last[key])
    # Without dynamic sampling every group trains, and the uninformative ones are still
    # counted: at the start most groups of 8 (a digit first ~4% of the time) are all zero.
    assert all(h["prompts_sampled"] == 16 for h in history)
    assert 4 <= history[0]["zero_std_groups"] <= 16, history[0]


def test_a_diverging_run_stops_like_training(tmp_path):
    """Non-finite updates are skipped; `train.max_nonfinite_streak` in a row stop the run."""
    cfg = _config(tmp_path / "nan", 8, **{"optim.lr": 1e9, "train.max_nonfinite_streak": 2})
    with pytest.raises(NonFiniteLoss, match="2 steps in a row .*max_nonfinite_streak=2"):
        run(cfg, out=io.StringIO())


def test_kl_reference_is_the_initial_policy(tmp_path):
    """At the first update the policy is the reference (KL 0); after it, they part."""
    history = run(_config(tmp_path / "kl", 2, **{"rl.loss.kl_coef": 0.1}), out=io.StringIO())
    assert history[0]["kl"] < 1e-6, history[0]["kl"]
    assert history[1]["kl"] > 1e-4, history[1]["kl"]


def test_rl_resumes_exactly(tmp_path):
    """With several updates per rollout (old logprobs recomputed, shuffled mini-batches) and a
    KL reference re-created on resume."""
    ppo = {"rl.ppo_epochs": 2, "rl.mini_batches": 2, "rl.loss.kl_coef": 0.05}
    whole = run(_config(tmp_path / "whole", 6, **ppo), out=io.StringIO())
    run(_config(tmp_path / "parts", 3, **ppo), out=io.StringIO())  # a run stopped after step 3
    resumed = run(_config(tmp_path / "parts", 6, **ppo), out=io.StringIO())
    assert [h["step"] for h in resumed] == [4, 5, 6]
    for a, b in zip(whole[3:], resumed, strict=True):
        for key in ("reward_mean", "loss", "grad_norm", "response_length_mean", "entropy", "kl"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    lines = [json.loads(x) for x in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_a_stop_right_after_a_checkpointed_step_saves_once(tmp_path, monkeypatch):
    """SIGTERM just after step 1 was saved (checkpoint.every=1): no second save of step 1,
    the run stops with Preempted (exit 143) and its checkpoint records the prompt position."""
    import os
    import signal

    from infir2_jax.train.runner import Runner
    from infir2_jax.train.stopping import Preempted

    save, sent = Runner.save, []

    def save_then_terminate(self, state, step):
        saved = save(self, state, step)
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # only recorded by the runner's handler
        return saved

    monkeypatch.setattr(Runner, "save", save_then_terminate)
    run_dir = tmp_path / "run"
    out = io.StringIO()
    with pytest.raises(Preempted) as stopped:
        run(_config(run_dir, 4, **{"checkpoint.every": 1}), out=out)
    assert stopped.value.args == (1,)
    assert "stopped by SIGTERM after step 1; checkpoint saved" in out.getvalue()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["1"]
    meta = json.loads((run_dir / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert meta["step"] == 1 and meta["prompt_position"] == 16


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"rl.reward": "nope"}, "rl.reward=nope"),
        ({"rl.n": 1}, "n must be >= 2"),
        ({"train.batch_size": 1}, "train.batch_size=1"),
        ({"rl.mini_batches": 3}, "rl.mini_batches=3"),
        ({"rl.overlong": "penalty"}, "overlong_buffer"),
    ],
)
def test_rl_bad_settings_are_named(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        run(_config(tmp_path / "bad", 1, **extra), out=io.StringIO())


def test_progress_counts_evaluations_and_the_last_line_sums_up(tmp_path):
    """With an evaluation ahead, the ETA says it does not count it until one has been timed;
    the last line gives the time, the final loss and the tokens trained on."""
    out = io.StringIO()
    extra = {"train.log_every": 1, "rl.eval_every": 3, "rl.eval_max_prompts": 4, "rl.eval_n": 2}
    history = run(_config(tmp_path / "run", 3, **extra), out=out)
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert "ETA --" in steps[0], steps
    assert steps[1].endswith("+ 1 eval") or "+ 1 eval |" in steps[1], steps  # step 3's
    assert "eval" not in steps[2].split("ETA")[1], steps  # evaluated before its line
    assert [h["step"] for h in history if "eval_reward" in h] == [3]
    done = lines[-1]
    assert done.startswith("done: 3 steps in "), done
    assert f"final loss {history[-1]['loss']:.4f}" in done
    assert "6,144 tokens (32×64 per step)" in done
