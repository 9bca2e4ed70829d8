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
from jax.experimental import multihost_utils

from infir2_jax.config import ConfigError, RunConfig
from infir2_jax.data import synthetic
from infir2_jax.data.tokenizer import load_tokenizer
from infir2_jax.generate import Completion, SamplingParams
from infir2_jax.parallel import describe
from infir2_jax.rl.advantages import DynamicSampler, group_advantages, overlong_penalty
from infir2_jax.rl.batch import Rollout, pack_rollouts
from infir2_jax.rl.objective import jit_token_logprobs, policy_objective
from infir2_jax.rl.policy_loss import PolicyLossConfig
from infir2_jax.rl.prompts import PromptOrder, PromptSet, arithmetic_prompts, load_prompts
from infir2_jax.grading import RewardPool, make_reward
from infir2_jax.rl.rollout import make_rollout
from infir2_jax.train.checkpointing import SCHEDULE_META, TrainCheckpointer
from infir2_jax.train.loop import check_streak
from infir2_jax.train.metrics import MetricsLogger, make_sinks
from infir2_jax.train.optimizer import schedule_settings
from infir2_jax.train.setup import prepare, pretrained_params, start_state
from infir2_jax.train.sharding import jit_train_step
from infir2_jax.model.parts import Params, init_params
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


@dataclasses.dataclass
class _Collected:
    """One step's rollouts: the kept groups (batch order) with their shaped rewards, and what
    the first sampling round saw (the unbiased sample the reward metrics describe)."""

    groups: list  # [(Prompt, [Completion] * n)]
    rewards: np.ndarray  # [groups, n] grades + overlong penalty
    first_groups: list
    first_grades: np.ndarray  # [prompts_per_step, n]
    first_penalty: np.ndarray
    offered: int = 0
    dropped: int = 0
    generated: int = 0


def _collect(rollout, task, grader, cfg: RunConfig, order: PromptOrder, step: int) -> _Collected:
    """Samples `rl.n` responses per prompt and grades them; with dynamic sampling, groups whose
    rewards all agree are dropped and fresh prompts drawn (up to `max_sampling_rounds`), the
    batch then topped up with dropped groups (zero advantage) so every step has one shape."""
    rl = cfg.rl
    sampler = DynamicSampler(target=rl.prompts_per_step)
    dropped, collected = [], None
    for r in range(rl.max_sampling_rounds if rl.dynamic_sampling else 1):
        prompts = [task.prompts.prompts[i] for i in order.take(rl.prompts_per_step)]
        seed = int(np.random.default_rng([cfg.train.seed, step, r]).integers(2**31))
        results = rollout.generate([p.ids for p in prompts], _sampling(cfg, task, seed, rl.n))
        texts = [task.decode(c.output_ids) for per in results for c in per]
        labels = [p.label for p in prompts for _ in range(rl.n)]
        grades = grader(texts, labels).reshape(len(prompts), rl.n)
        penalty = np.zeros_like(grades)
        if rl.overlong == "penalty":
            lengths = [[len(c.output_ids) for c in per] for per in results]
            penalty = overlong_penalty(lengths, rl.max_new_tokens, rl.overlong_buffer)
        groups, rewards = list(zip(prompts, results, strict=True)), grades + penalty
        if collected is None:
            collected = _Collected([], rewards, groups, grades, penalty)
        collected.generated += sum(len(c.output_ids) for per in results for c in per)
        if not rl.dynamic_sampling:
            sampler.kept = list(zip(groups, rewards, strict=True))
            break
        sampler.offer(list(zip(groups, rewards, strict=True)), rewards)
        dropped += [(g, rw) for g, rw in zip(groups, rewards, strict=True) if rw.max() == rw.min()]
        if not sampler.needs_more:
            break
    kept = sampler.batch()
    kept += dropped[: rl.prompts_per_step - len(kept)]
    collected.groups = [g for g, _ in kept]
    collected.rewards = np.stack([rw for _, rw in kept])
    collected.offered = sampler.offered or len(collected.first_groups)
    collected.dropped = sampler.dropped
    return collected


def _rollouts(collected: _Collected, rl) -> tuple[list[Rollout], int]:
    """(training samples, how many truncated ones overlong filtering left out)."""
    advantages = group_advantages(collected.rewards, divide_by_std=rl.divide_by_std)
    rollouts, filtered = [], 0
    for g, (prompt, per) in enumerate(collected.groups):
        for s, c in enumerate(per):
            if rl.overlong == "filter" and c.finish_reason == "length":
                filtered += 1
                continue
            rollouts.append(Rollout(prompt.ids, c.output_ids, c.logprobs, float(advantages[g, s])))
    return rollouts, filtered


def _evaluate(rollout, task, grader, cfg, step) -> dict[str, float]:
    """pass@1 averaged over `rl.eval_n` samples per prompt (the first `eval_max_prompts`)."""
    prompts = task.eval_prompts.prompts[: cfg.rl.eval_max_prompts]
    sampling = _sampling(cfg, task, 1_000_003 * (step + 1), cfg.rl.eval_n, evaluation=True)
    results = rollout.generate([p.ids for p in prompts], sampling)
    texts = [task.decode(c.output_ids) for per in results for c in per]
    labels = [p.label for p in prompts for _ in range(cfg.rl.eval_n)]
    rewards = grader(texts, labels)
    return {"eval_reward": float(rewards.mean()), "eval_accuracy": float((rewards > 0.5).mean())}


def _rollout_metrics(collected: _Collected) -> dict[str, float]:
    completions: list[Completion] = [c for _, per in collected.first_groups for c in per]
    lengths = np.array([len(c.output_ids) for c in completions])
    metrics = {
        "reward_mean": float((collected.first_grades + collected.first_penalty).mean()),
        "accuracy": float((collected.first_grades > 0.5).mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "truncated_fraction": float(np.mean([c.finish_reason == "length" for c in completions])),
        "zero_std_groups": float(collected.dropped),
        "prompts_sampled": float(collected.offered),
    }
    if collected.first_penalty.any():
        metrics["overlong_penalty_mean"] = float(collected.first_penalty.mean())
    return metrics


class _Updater:
    """The optimizer updates of one rollout batch: `ppo_epochs` passes of `mini_batches`
    strided slices, each one step of the shared train step with the policy objective. The old
    policy's log-probabilities (several updates) and the reference's (KL) are computed first,
    over the whole batch."""

    def __init__(self, cfg: RunConfig, setup, reference):
        rl = cfg.rl
        self.cfg, self.layout, self.reference = cfg, setup.layout, reference
        loss_fn = policy_objective(
            PolicyLossConfig(
                clip_low=rl.clip_low, clip_high=rl.clip_high, aggregation=rl.aggregation,
                tis_cap=rl.tis_cap, entropy_coef=rl.entropy_coef, kl_coef=rl.kl_coef,
                kl_estimator=rl.kl_estimator,
            ),
            num_samples=rl.prompts_per_step * rl.n, temperature=rl.temperature,
        )  # fmt: skip
        self.step_fn = jit_train_step(
            setup.layout, setup.state_sharding, setup.parts, setup.optimizer, setup.schedule,
            cfg.train.micro_batches, loss_fn,
        )  # fmt: skip
        self.logprobs = None
        if rl.updates_per_rollout > 1 or reference is not None:
            self.logprobs = jit_token_logprobs(
                setup.parts, setup.layout, setup.state_sharding.params,
                cfg.train.micro_batches * rl.mini_batches, rl.temperature,
            )  # fmt: skip

    def __call__(self, state, batch: dict[str, np.ndarray], step: int):
        rl = self.cfg.rl
        if self.logprobs is not None:
            on_devices = self._global(batch)
            if rl.updates_per_rollout > 1:
                batch["old_logprobs"] = _host(self.logprobs(state.params, on_devices))
            if self.reference is not None:
                batch["ref_logprobs"] = _host(self.logprobs(self.reference, on_devices))
        rng = np.random.default_rng([self.cfg.train.seed, step, 7])
        total: dict[str, float] = {}
        for _ in range(rl.ppo_epochs):
            order = rng.permutation(len(batch["input_ids"])) if rl.mini_batches > 1 else None
            for m in range(rl.mini_batches):
                rows = slice(None) if order is None else order[m :: rl.mini_batches]
                state, metrics = self.step_fn(
                    state, self._global({k: v[rows] for k, v in batch.items()})
                )
                for k, v in jax.device_get(metrics).items():
                    total[k] = total.get(k, 0.0) + float(v)
        updates = rl.updates_per_rollout
        for k in ("loss", "grad_norm", "lr"):
            total[k] /= updates  # means over the updates; the rest are sums
        total["nonfinite_streak"] = float(metrics["nonfinite_streak"])  # after the last one
        return state, total

    def _global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host rows (the same on every process) -> arrays sharded over the data axes."""
        sharding = self.layout.batch_sharding()
        return {
            k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()
        }


def _host(array: jax.Array) -> np.ndarray:
    """A batch-sharded array, whole, on every process."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _reference_params(cfg: RunConfig, setup) -> Params | None:
    """The frozen KL reference, in the compute dtype: the initial policy (`train.init_from`, or
    the seed's random init) — re-created the same way on resume."""
    if not cfg.rl.kl_coef:
        return None
    shardings = setup.state_sharding.params
    if cfg.train.init_from is not None:
        params = jax.device_put(pretrained_params(cfg, setup.parts)[0], shardings)
    else:
        params = jax.jit(
            lambda: init_params(cfg.model, cfg.train.seed, setup.plan)[0], out_shardings=shardings
        )()
    cast = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(cfg.model.dtype), p))
    return jax.block_until_ready(cast(params))


def _training_batch(cfg: RunConfig, rollouts: list[Rollout], rows_multiple: int, step: int):
    try:
        batch = pack_rollouts(rollouts, cfg.train.seq_len, row_multiple=rows_multiple)
    except ValueError as e:
        raise ConfigError(f"rl: {e}; raise train.seq_len") from None
    rows = len(batch["input_ids"])
    if rows > cfg.train.batch_size:
        raise ConfigError(
            f"rl: step {step}'s rollouts fill {rows} rows of train.seq_len="
            f"{cfg.train.seq_len}, more than train.batch_size={cfg.train.batch_size}"
        )
    return {
        k: np.concatenate([v, _padding_rows(k, v, cfg.train.batch_size - rows)])
        for k, v in batch.items()
    }


def _check(cfg: RunConfig, setup) -> None:
    rl = cfg.rl
    if setup.gemm.stateful:
        raise ConfigError(f"fp8.recipe={cfg.fp8.recipe}: RL rollouts need a stateless recipe")
    data = setup.layout.size("data") * setup.layout.size("fsdp")
    unit = data * cfg.train.micro_batches
    if cfg.train.batch_size % (rl.mini_batches * unit):
        raise ConfigError(
            f"rl.mini_batches={rl.mini_batches}: train.batch_size={cfg.train.batch_size} must "
            f"split into that many mini-batches of a multiple of {unit} rows "
            "(train.micro_batches × data-parallel devices)"
        )


def run(cfg: RunConfig, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Runs (or resumes) RL to `train.steps`; returns the metrics logged by this call."""
    if cfg.rl is None:
        raise ConfigError("this config has no `rl` section; python -m infir2_jax.rl needs one")
    rl = cfg.rl
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The optimizer counts updates: `ppo_epochs × mini_batches` per RL step.
    setup = prepare(_optimizer_horizon(cfg))
    _check(cfg, setup)
    task = _task(cfg)
    checkpointer = TrainCheckpointer(run_dir / "checkpoints", cfg.checkpoint)
    state, start, meta, _ = start_state(cfg, setup, checkpointer, None, out)
    order = PromptOrder(len(task.prompts), cfg.train.seed, int(meta.get(PROMPT_POSITION, 0)))
    update = _Updater(cfg, setup, _reference_params(cfg, setup))
    longest = max(len(p.ids) for p in task.prompts.prompts + task.eval_prompts.prompts)
    max_len = longest + max(rl.max_new_tokens, rl.eval_max_new_tokens or 0)
    rollout = make_rollout(cfg, setup, state.params, max_len, run_dir)
    grader = _Grader(cfg)
    print(f"mesh: {describe(setup.layout)}", file=out, flush=True)
    print(
        f"rl: {len(task.prompts):,} prompts ({task.prompts.duplicates:,} duplicates, "
        f"{task.prompts.too_long:,} too long dropped) | {rl.prompts_per_step}×{rl.n} samples "
        f"per step | reward {rl.reward} | rollouts {rl.rollout.engine} | "
        f"{rl.updates_per_rollout} update(s) per rollout | fp8 {cfg.fp8.recipe} | steps "
        f"{start}->{cfg.train.steps}",
        file=out,
        flush=True,
    )
    schedule_meta = schedule_settings(cfg.optim, cfg.train.steps * rl.updates_per_rollout)
    primary = jax.process_index() == 0
    logger = MetricsLogger(
        run_dir / "metrics.jsonl" if primary else None, cfg.train.steps, start, out,
        sinks=make_sinks(cfg, run_dir, start, out) if primary else [],
    )  # fmt: skip
    rows_multiple = setup.layout.size("data") * setup.layout.size("fsdp") * rl.mini_batches
    history, stop = [], StopRequest()

    def save(done: int) -> None:
        check_streak(int(state.nonfinite_streak), done, cfg, checkpointer)
        meta = {SCHEDULE_META: schedule_meta, PROMPT_POSITION: order.position}
        checkpointer.save(state, cfg.model, None, meta, step=done)

    try:
        for step in range(start, cfg.train.steps):
            if stop.requested:
                save(step)
                print(f"stopped by {stop.requested} after step {step}; checkpoint saved", file=out)
                raise Preempted(step)
            done = step + 1
            t0 = time.perf_counter()
            rollout.sync(state.params, step)
            t_sync = time.perf_counter()
            collected = _collect(rollout, task, grader, cfg, order, step)
            rollouts, filtered = _rollouts(collected, rl)
            t_rollout = time.perf_counter()
            batch = _training_batch(cfg, rollouts, rows_multiple, done)
            state, metrics = update(state, batch, step)
            t_train = time.perf_counter()
            tokens = max(metrics["tokens"], 1.0)
            logged = {
                "loss": metrics["loss"],
                "grad_norm": metrics["grad_norm"],
                "lr": metrics["lr"],
                "nonfinite_streak": metrics["nonfinite_streak"],
                **_rollout_metrics(collected),
                "clip_fraction_low": metrics["clip_low"] / tokens,
                "clip_fraction_high": metrics["clip_high"] / tokens,
                "tis_weight_mean": metrics.get("tis_weight", tokens) / tokens,
                "tis_clipped_fraction": metrics.get("tis_clipped", 0.0) / tokens,
                "logprob_mismatch": metrics["logprob_mismatch"] / tokens,
                "entropy": metrics["entropy"] / tokens,
                "reward_failures": float(grader.timeouts),
                "rollout_tokens_per_sec": collected.generated / max(t_rollout - t_sync, 1e-9),
                "seconds_sync": t_sync - t0,
                "seconds_rollout": t_rollout - t_sync,
                "seconds_train": t_train - t_rollout,
            }
            if "kl" in metrics:
                logged["kl"] = metrics["kl"] / tokens
            if rl.overlong == "filter":
                logged["overlong_filtered"] = float(filtered)
            if rl.eval_every and (done % rl.eval_every == 0 or done == cfg.train.steps):
                rollout.sync(state.params, done)  # the next step's rollouts reuse this sync
                logged.update(_evaluate(rollout, task, grader, cfg, step))
            logger.log(done, logged, tokens / max(t_train - t_rollout, 1e-9), show=CONSOLE)
            history.append({"step": done, **logged})
            # Optimizer updates whose loss or gradient was non-finite were skipped; too many
            # in a row stop the run, the latest checkpoint intact (as in training).
            check_streak(int(metrics["nonfinite_streak"]), done, cfg, checkpointer)
            if checkpointer.due(done) or done == cfg.train.steps:
                save(done)
    finally:
        stop.restore()
        checkpointer.close()
        logger.close()
        grader.close()
        rollout.close()
    print(f"done: {cfg.train.steps} steps, checkpoints in {run_dir / 'checkpoints'}", file=out)
    return history


def _optimizer_horizon(cfg: RunConfig) -> RunConfig:
    """The config the optimizer and its schedule are built from: one step per update."""
    updates = cfg.rl.updates_per_rollout
    if updates == 1:
        return cfg
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train,
            steps=cfg.train.steps * updates,
            batch_size=cfg.train.batch_size // cfg.rl.mini_batches,
        ),
    )


def _padding_rows(key: str, like: np.ndarray, count: int) -> np.ndarray:
    """Empty rows: no tokens in the loss (mask 0, sample id -1)."""
    return np.full((count, *like.shape[1:]), -1 if key == "sample_ids" else 0, like.dtype)
