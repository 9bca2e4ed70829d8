"""The RL run: rollouts from the policy being trained, rewards, GRPO advantages, one step of
the shared train step with the policy objective — checkpointed and resumable like training.

Each step: the rollout engine (generate/engine.py) takes the trainer's current parameters
(on the training mesh, no copy beyond its compute-dtype cast), samples `rl.n` responses for
each of `rl.prompts_per_step` prompts, the responses are graded, groups whose rewards all agree
are replaced by fresh prompts (DAPO's dynamic sampling, up to `rl.max_sampling_rounds`), and
the kept groups are packed into `train.batch_size` rows of `train.seq_len` tokens for the
train step. Prompts follow a seeded per-epoch shuffle whose position is checkpointed, and
every random draw is seeded by (train.seed, step), so a resumed run repeats exactly what the
uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from infir2_jax.config import ConfigError, RunConfig
from infir2_jax.data import synthetic
from infir2_jax.data.tokenizer import load_tokenizer
from infir2_jax.generate import Completion, Engine, SamplingParams
from infir2_jax.parallel import describe
from infir2_jax.parallel.rules import DECODE_RULES, Layout
from infir2_jax.rl.advantages import DynamicSampler, group_advantages
from infir2_jax.rl.batch import Rollout, pack_rollouts
from infir2_jax.rl.objective import policy_objective
from infir2_jax.rl.policy_loss import PolicyLossConfig
from infir2_jax.rl.prompts import PromptOrder, PromptSet, arithmetic_prompts, load_prompts
from infir2_jax.rl.rewards import RewardPool, make_reward
from infir2_jax.train.checkpointing import SCHEDULE_META, TrainCheckpointer
from infir2_jax.train.metrics import MetricsLogger, make_sinks
from infir2_jax.train.optimizer import schedule_settings
from infir2_jax.train.setup import prepare, start_state
from infir2_jax.train.sharding import jit_train_step
from infir2_jax.train.stopping import Preempted, StopRequest

PROMPT_POSITION = "prompt_position"  # checkpoint meta: prompts drawn so far
CONSOLE = ("reward_mean", "response_length_mean", "zero_std_groups", "logprob_mismatch")


@dataclasses.dataclass
class _Task:
    prompts: PromptSet
    eval_prompts: PromptSet
    decode: Any  # ids -> text
    stop_ids: tuple[int, ...]


def _task(cfg: RunConfig) -> _Task:
    rl = cfg.rl
    if rl.task == "arithmetic":
        if cfg.model.vocab_size != synthetic.VOCAB_SIZE:
            raise ConfigError(
                f"rl.task=arithmetic uses byte tokens: model.vocab_size must be "
                f"{synthetic.VOCAB_SIZE}, got {cfg.model.vocab_size}"
            )
        facts = arithmetic_prompts()
        newline = synthetic.encode("\n")[0]
        return _Task(facts, facts, synthetic.decode, (int(newline), synthetic.EOS_ID))
    tokenizer = load_tokenizer(rl.tokenizer, rl.chat_template)

    def read(path):
        return load_prompts(
            path, tokenizer, dedupe=rl.dedupe, max_tokens=rl.max_prompt_tokens,
            question_template=rl.question_template,
        )  # fmt: skip

    prompts = read(rl.prompts)
    evaluation = read(rl.eval_prompts) if rl.eval_prompts else prompts
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    stop_ids = tuple(sorted(i for i in stop if isinstance(i, int) and i != tokenizer.unk_token_id))

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return _Task(prompts, evaluation, decode, stop_ids)


class _Grader:
    def __init__(self, cfg: RunConfig):
        rl = cfg.rl
        options = {"require_thinking": rl.require_thinking} if rl.require_thinking else {}
        try:
            self.grade = make_reward(rl.reward, **options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"rl.reward={rl.reward}: {e}") from None
        self.pool = (
            RewardPool(self.grade, workers=rl.reward_workers, timeout=rl.reward_timeout)
            if rl.reward_workers
            else None
        )
        self.timeouts = 0

    def __call__(self, texts: list[str], labels: list[str]) -> np.ndarray:
        if self.pool is None:
            return np.array([self.grade(t, y) for t, y in zip(texts, labels, strict=True)])
        grades = self.pool(texts, labels)
        self.timeouts += grades.timeouts + grades.errors
        return np.array(grades.scores)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _sampling(
    cfg: RunConfig, task: _Task, seed: int, n: int, evaluation: bool = False
) -> SamplingParams:
    rl = cfg.rl

    def pick(eval_value, value):
        return value if not evaluation or eval_value is None else eval_value

    return SamplingParams(
        temperature=pick(rl.eval_temperature, rl.temperature),
        top_p=pick(rl.eval_top_p, rl.top_p),
        max_new_tokens=pick(rl.eval_max_new_tokens, rl.max_new_tokens),
        n=n, seed=seed % 2**31, stop_token_ids=task.stop_ids,
    )  # fmt: skip


def _rollout_round(engine, task, grader, cfg, indices, seed):
    """(groups [(prompt, completions)], rewards [prompts, n]) for these prompts."""
    prompts = [task.prompts.prompts[i] for i in indices]
    results = engine.generate([p.ids for p in prompts], _sampling(cfg, task, seed, cfg.rl.n))
    texts = [task.decode(c.output_ids) for per in results for c in per]
    labels = [p.label for p in prompts for _ in range(cfg.rl.n)]
    rewards = grader(texts, labels).reshape(len(prompts), cfg.rl.n)
    return list(zip(prompts, results, strict=True)), rewards


def _evaluate(engine, task, grader, cfg, step) -> dict[str, float]:
    """pass@1 averaged over `rl.eval_n` samples per prompt (the first `eval_max_prompts`)."""
    prompts = task.eval_prompts.prompts[: cfg.rl.eval_max_prompts]
    sampling = _sampling(cfg, task, 1_000_003 * (step + 1), cfg.rl.eval_n, evaluation=True)
    results = engine.generate([p.ids for p in prompts], sampling)
    texts = [task.decode(c.output_ids) for per in results for c in per]
    labels = [p.label for p in prompts for _ in range(cfg.rl.eval_n)]
    rewards = grader(texts, labels)
    return {"eval_reward": float(rewards.mean()), "eval_accuracy": float((rewards > 0.5).mean())}


def _rollout_metrics(groups, rewards: np.ndarray) -> dict[str, float]:
    completions: list[Completion] = [c for _, per in groups for c in per]
    lengths = np.array([len(c.output_ids) for c in completions])
    return {
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards > 0.5).mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "truncated_fraction": float(np.mean([c.finish_reason == "length" for c in completions])),
    }


def run(cfg: RunConfig, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Runs (or resumes) RL to `train.steps`; returns the metrics logged by this call."""
    if cfg.rl is None:
        raise ConfigError("this config has no `rl` section; python -m infir2_jax.rl needs one")
    rl = cfg.rl
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare(cfg)
    if setup.gemm.stateful:
        raise ConfigError(f"fp8.recipe={cfg.fp8.recipe}: RL rollouts need a stateless recipe")
    if setup.layout.size("context") > 1:
        raise ConfigError("rl: the JAX rollout engine does not run under parallel.context > 1")
    task = _task(cfg)
    checkpointer = TrainCheckpointer(run_dir / "checkpoints", cfg.checkpoint)
    state, start, meta, _ = start_state(cfg, setup, checkpointer, None, out)
    order = PromptOrder(len(task.prompts), cfg.train.seed, int(meta.get(PROMPT_POSITION, 0)))
    samples = rl.prompts_per_step * rl.n
    loss_fn = policy_objective(
        PolicyLossConfig(
            clip_low=rl.clip_low, clip_high=rl.clip_high, aggregation=rl.aggregation,
            tis_cap=rl.tis_cap, entropy_coef=rl.entropy_coef,
        ),
        num_samples=samples, temperature=rl.temperature,
    )  # fmt: skip
    step_fn = jit_train_step(
        setup.layout, setup.state_sharding, setup.parts, setup.optimizer, setup.schedule,
        cfg.train.micro_batches, loss_fn,
    )  # fmt: skip
    longest = max(len(p.ids) for p in task.prompts.prompts + task.eval_prompts.prompts)
    engine = Engine(
        cfg.model, state.params, gemm=setup.gemm,
        layout=Layout(setup.layout.mesh, DECODE_RULES, "decode"), slots=rl.slots,
        steps_per_call=rl.steps_per_call,
        max_len=longest + max(rl.max_new_tokens, rl.eval_max_new_tokens or 0),
    )  # fmt: skip
    grader = _Grader(cfg)
    print(f"mesh: {describe(setup.layout)}", file=out, flush=True)
    print(
        f"rl: {len(task.prompts):,} prompts ({task.prompts.duplicates:,} duplicates, "
        f"{task.prompts.too_long:,} too long dropped) | {rl.prompts_per_step}×{rl.n} samples "
        f"per step | reward {rl.reward} | fp8 {cfg.fp8.recipe} | steps {start}->"
        f"{cfg.train.steps}",
        file=out,
        flush=True,
    )
    schedule_meta = schedule_settings(cfg.optim, cfg.train.steps)
    primary = jax.process_index() == 0
    logger = MetricsLogger(
        run_dir / "metrics.jsonl" if primary else None, cfg.train.steps, start, out,
        sinks=make_sinks(cfg, run_dir, start, out) if primary else [],
    )  # fmt: skip
    data_sharding = setup.layout.batch_sharding()
    rows_per_device = setup.layout.size("data") * setup.layout.size("fsdp")
    history, stop = [], StopRequest()

    def save() -> None:
        meta = {SCHEDULE_META: schedule_meta, PROMPT_POSITION: order.position}
        checkpointer.save(state, cfg.model, None, meta)

    try:
        for step in range(start, cfg.train.steps):
            if stop.requested:
                save()
                print(f"stopped by {stop.requested} after step {step}; checkpoint saved", file=out)
                raise Preempted(step)
            done = step + 1
            t0 = time.perf_counter()
            engine.update_params(state.params)
            jax.block_until_ready(engine.params)
            t_sync = time.perf_counter()
            sampler = DynamicSampler(target=rl.prompts_per_step)
            dropped, first, generated = [], None, 0
            rounds = rl.max_sampling_rounds if rl.dynamic_sampling else 1
            for r in range(rounds):
                indices = order.take(rl.prompts_per_step)
                seed = int(np.random.default_rng([cfg.train.seed, step, r]).integers(2**31))
                groups, rewards = _rollout_round(engine, task, grader, cfg, indices, seed)
                generated += sum(len(c.output_ids) for _, per in groups for c in per)
                if first is None:
                    first = (groups, rewards)
                if not rl.dynamic_sampling:
                    sampler.kept = list(zip(groups, rewards, strict=True))
                    break
                sampler.offer(list(zip(groups, rewards, strict=True)), rewards)
                dropped += [
                    (g, rw) for g, rw in zip(groups, rewards, strict=True) if rw.max() == rw.min()
                ]
                if not sampler.needs_more:
                    break
            kept = sampler.batch()
            kept += dropped[: rl.prompts_per_step - len(kept)]  # zero-advantage filler
            t_rollout = time.perf_counter()
            advantages = group_advantages(
                np.stack([rw for _, rw in kept]), divide_by_std=rl.divide_by_std
            )
            rollouts = [
                Rollout(prompt.ids, c.output_ids, c.logprobs, float(advantages[g, s]))
                for g, ((prompt, per), _) in enumerate(kept)
                for s, c in enumerate(per)
            ]
            try:
                batch = pack_rollouts(rollouts, cfg.train.seq_len, row_multiple=rows_per_device)
            except ValueError as e:
                raise ConfigError(f"rl: {e}; raise train.seq_len") from None
            rows = len(batch["input_ids"])
            if rows > cfg.train.batch_size:
                raise ConfigError(
                    f"rl: step {done}'s rollouts fill {rows} rows of train.seq_len="
                    f"{cfg.train.seq_len}, more than train.batch_size={cfg.train.batch_size}"
                )
            batch = {
                k: np.concatenate([v, _padding_rows(k, v, cfg.train.batch_size - rows)])
                for k, v in batch.items()
            }
            global_batch = {
                k: jax.make_array_from_process_local_data(data_sharding, v)
                for k, v in batch.items()
            }
            state, metrics = step_fn(state, global_batch)
            metrics = jax.device_get(metrics)
            t_train = time.perf_counter()
            tokens = max(float(metrics["tokens"]), 1.0)
            logged = {
                "loss": float(metrics["loss"]),
                "grad_norm": float(metrics["grad_norm"]),
                "lr": float(metrics["lr"]),
                "nonfinite_streak": float(metrics["nonfinite_streak"]),
                **_rollout_metrics(*first),
                "clip_fraction_low": float(metrics["clip_low"]) / tokens,
                "clip_fraction_high": float(metrics["clip_high"]) / tokens,
                "tis_weight_mean": float(metrics.get("tis_weight", tokens)) / tokens,
                "tis_clipped_fraction": float(metrics.get("tis_clipped", 0.0)) / tokens,
                "logprob_mismatch": float(metrics["logprob_mismatch"]) / tokens,
                "entropy": float(metrics["entropy"]) / tokens,
                "zero_std_groups": float(sampler.dropped),
                "prompts_sampled": float(sampler.offered or len(first[0])),
                "reward_failures": float(grader.timeouts),
                "rollout_tokens_per_sec": generated / max(t_rollout - t_sync, 1e-9),
                "seconds_sync": t_sync - t0,
                "seconds_rollout": t_rollout - t_sync,
                "seconds_train": t_train - t_rollout,
            }
            if rl.eval_every and (done % rl.eval_every == 0 or done == cfg.train.steps):
                engine.update_params(state.params)
                logged.update(_evaluate(engine, task, grader, cfg, step))
            logger.log(done, logged, tokens / max(t_train - t_rollout, 1e-9), show=CONSOLE)
            history.append({"step": done, **logged})
            if checkpointer.due(done) or done == cfg.train.steps:
                save()
    finally:
        stop.restore()
        checkpointer.close()
        logger.close()
        grader.close()
    print(f"done: {cfg.train.steps} steps, checkpoints in {run_dir / 'checkpoints'}", file=out)
    return history


def _padding_rows(key: str, like: np.ndarray, count: int) -> np.ndarray:
    """Empty rows: no tokens in the loss (mask 0, sample id -1)."""
    return np.full((count, *like.shape[1:]), -1 if key == "sample_ids" else 0, like.dtype)
