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
from infir2_jax.grading import RewardPool, make_reward
from infir2_jax.model.parts import Params, init_params
from infir2_jax.parallel import describe
from infir2_jax.rl.advantages import (
    DynamicSampler,
    group_advantages,
    informative,
    overlong_penalty,
)
from infir2_jax.rl.batch import Rollout, pack_rollouts
from infir2_jax.rl.objective import jit_token_logprobs, policy_objective
from infir2_jax.rl.prompts import PromptOrder, PromptSet, arithmetic_prompts, load_prompts
from infir2_jax.rl.rollout import make_rollout
from infir2_jax.train.checkpointing import TrainCheckpointer
from infir2_jax.train.runner import Runner, Steps
from infir2_jax.train.setup import Setup, prepare, pretrained_params, run_directory, start_state
from infir2_jax.train.sharding import jit_train_step

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
            question_template=rl.question_template, system_prompt=rl.system_prompt,
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
        self.pool = RewardPool(
            self.grade, workers=rl.reward_workers, timeout=rl.reward_timeout,
            memory_mb=rl.reward_memory_mb,
        )  # fmt: skip
        self.timeouts = 0

    def __call__(self, texts: list[str], labels: list[str]) -> np.ndarray:
        grades = self.pool(texts, labels)
        self.timeouts += grades.timeouts + grades.errors
        return np.array(grades.scores)

    def close(self) -> None:
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
        if not rl.dynamic_sampling:  # every group trains; zero-std ones are still counted
            sampler.kept = list(zip(groups, rewards, strict=True))
            sampler.offered = len(groups)
            sampler.dropped = int((~informative(rewards)).sum())
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
        # These two count every dynamic-sampling round of the step (the metrics above: the
        # first round's): groups whose rewards all agree, out of the prompts drawn.
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
    over the whole batch. As in training, a batch with more segments per row than cuDNN
    attention takes runs through functions built for the Pallas kernel (`Steps`)."""

    def __init__(self, cfg: RunConfig, setup: Setup, reference, out: TextIO):
        rl = cfg.rl
        self.cfg, self.layout, self.reference = cfg, setup.layout, reference
        loss_fn = policy_objective(
            rl.loss, num_samples=rl.prompts_per_step * rl.n, temperature=rl.temperature
        )
        needs_logprobs = rl.updates_per_rollout > 1 or reference is not None

        def build(parts):
            step_fn = jit_train_step(
                setup.layout, setup.state_sharding, parts, setup.optimizer, setup.schedule,
                cfg.train.micro_batches, loss_fn,
            )  # fmt: skip
            if not needs_logprobs:
                return step_fn, None
            return step_fn, jit_token_logprobs(
                parts, setup.layout, setup.state_sharding.params,
                cfg.train.micro_batches * rl.mini_batches, rl.temperature,
            )  # fmt: skip

        self.steps = Steps(build, setup.parts, setup.fallback_parts, setup.plan.segment_limit, out)

    def __call__(self, state, batch: dict[str, np.ndarray], step: int):
        rl = self.cfg.rl
        step_fn, logprobs = self.steps.for_batch(batch)
        if logprobs is not None:
            on_devices = self._global(batch)
            if rl.updates_per_rollout > 1:
                batch["old_logprobs"] = _host(logprobs(state.params, on_devices))
            if self.reference is not None:
                batch["ref_logprobs"] = _host(logprobs(self.reference, on_devices))
        rng = np.random.default_rng([self.cfg.train.seed, step, 7])
        total: dict[str, float] = {}
        for _ in range(rl.ppo_epochs):
            order = rng.permutation(len(batch["input_ids"])) if rl.mini_batches > 1 else None
            for m in range(rl.mini_batches):
                rows = slice(None) if order is None else order[m :: rl.mini_batches]
                state, metrics = step_fn(
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
    if not cfg.rl.loss.kl_coef:
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


@dataclasses.dataclass
class _StepOutcome:
    metrics: dict[str, float]  # the updates' (sums, some means)
    collected: _Collected
    filtered: int
    times: tuple[float, float, float, float]  # start, synced, rolled out, trained


class _Reinforce(Runner):
    """RL: each step rolls out from the current policy, grades, packs the kept groups and
    makes `rl.updates_per_rollout` updates; every `rl.eval_every` steps pass@1 on the
    evaluation prompts. Checkpoints also record the prompt order's position."""

    console = CONSOLE

    def __init__(self, cfg: RunConfig, setup: Setup, checkpointer, task: _Task, state, begun, out):
        rl = cfg.rl
        start, meta, resumed = begun
        super().__init__(
            cfg, checkpointer, out, start=start, meta=meta, resumed=resumed,
            eval_every=rl.eval_every, updates_per_step=rl.updates_per_rollout,
        )  # fmt: skip
        self.task = task
        self.order = PromptOrder(
            len(task.prompts), cfg.train.seed, int(meta.get(PROMPT_POSITION, 0))
        )
        self.update = _Updater(cfg, setup, _reference_params(cfg, setup), out)
        longest = max(len(p.ids) for p in task.prompts.prompts + task.eval_prompts.prompts)
        max_len = longest + max(rl.max_new_tokens, rl.eval_max_new_tokens or 0)
        self.rollout = make_rollout(cfg, setup, state.params, max_len, self.run_dir)
        self.grader = _Grader(cfg)
        self.rows_multiple = setup.layout.size("data") * setup.layout.size("fsdp") * rl.mini_batches

    def step(self, state, step):
        t0 = time.perf_counter()
        self.rollout.sync(state.params, step)
        t_sync = time.perf_counter()
        collected = _collect(self.rollout, self.task, self.grader, self.cfg, self.order, step)
        rollouts, filtered = _rollouts(collected, self.cfg.rl)
        t_rollout = time.perf_counter()
        batch = _training_batch(self.cfg, rollouts, self.rows_multiple, step + 1)
        state, metrics = self.update(state, batch, step)
        t_train = time.perf_counter()
        return state, _StepOutcome(metrics, collected, filtered, (t0, t_sync, t_rollout, t_train))

    def log_values(self, state, raw: _StepOutcome, done):
        metrics, (t0, t_sync, t_rollout, t_train) = raw.metrics, raw.times
        tokens = max(metrics["tokens"], 1.0)
        logged = {
            "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"],
            "lr": metrics["lr"],
            "nonfinite_streak": metrics["nonfinite_streak"],
            **_rollout_metrics(raw.collected),
            "clip_fraction_low": metrics["clip_low"] / tokens,
            "clip_fraction_high": metrics["clip_high"] / tokens,
            "tis_weight_mean": metrics.get("tis_weight", tokens) / tokens,
            "tis_clipped_fraction": metrics.get("tis_clipped", 0.0) / tokens,
            "logprob_mismatch": metrics["logprob_mismatch"] / tokens,
            "entropy": metrics["entropy"] / tokens,
            "reward_failures": float(self.grader.timeouts),
            "rollout_tokens_per_sec": raw.collected.generated / max(t_rollout - t_sync, 1e-9),
            "seconds_sync": t_sync - t0,
            "seconds_rollout": t_rollout - t_sync,
            "seconds_train": t_train - t_rollout,
        }
        if "kl" in metrics:
            logged["kl"] = metrics["kl"] / tokens
        if self.cfg.rl.overlong == "filter":
            logged["overlong_filtered"] = float(raw.filtered)
        if self.eval_due(done):
            started = time.perf_counter()
            self.rollout.sync(state.params, done)  # the next step's rollouts reuse this sync
            logged.update(_evaluate(self.rollout, self.task, self.grader, self.cfg, done - 1))
            self.logger.eval_took(time.perf_counter() - started)
        return logged, tokens / max(t_train - t_rollout, 1e-9)

    def checkpoint_meta(self):
        return {**super().checkpoint_meta(), PROMPT_POSITION: self.order.position}

    def close(self):
        super().close()
        self.grader.close()
        self.rollout.close()


def run(cfg: RunConfig, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Runs (or resumes) RL to `train.steps`; returns the metrics logged by this call."""
    if cfg.rl is None:
        raise ConfigError("this config has no `rl` section; python -m infir2_jax.rl needs one")
    rl = cfg.rl
    with run_directory(Path(cfg.train.run_dir)) as run_dir:  # removed if set-up fails
        # The optimizer counts updates: `ppo_epochs × mini_batches` per RL step.
        setup = prepare(
            cfg,
            updates=cfg.train.steps * rl.updates_per_rollout,
            rows=cfg.train.batch_size // rl.mini_batches,
        )
        _check(cfg, setup)
        task = _task(cfg)
        checkpointer = TrainCheckpointer(run_dir / "checkpoints", cfg.checkpoint)
        state, start, meta, resumed = start_state(cfg, setup, checkpointer, None, out)
        runner = _Reinforce(cfg, setup, checkpointer, task, state, (start, meta, resumed), out)
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
    return runner.run(state)


def _padding_rows(key: str, like: np.ndarray, count: int) -> np.ndarray:
    """Empty rows: no tokens in the loss (mask 0, sample id -1)."""
    return np.full((count, *like.shape[1:]), -1 if key == "sample_ids" else 0, like.dtype)
