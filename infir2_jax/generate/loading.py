"""An engine from a model path plus `--set model.* / execution.* / fp8.* / parallel.*`
assignments: the start shared by the command lines over the generation engine (`generate`,
`serve`)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import yaml
from flax import traverse_util

from infir2_jax.checkpoint import CheckpointError
from infir2_jax.config import (
    ConfigError,
    ExecutionConfig,
    FP8Config,
    ParallelConfig,
    parse_assignments,
    parse_section,
)
from infir2_jax.data import DataError
from infir2_jax.data.tokenizer import load_tokenizer
from infir2_jax.fp8 import make_gemm
from infir2_jax.generate.engine import Engine, decode_layout
from infir2_jax.model import ModelConfig
from infir2_jax.pretrained import load_params, read_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SECTIONS = ("model", "execution", "fp8", "parallel")


def sections(assignments: list[str]) -> dict[str, dict]:
    """`--set` assignments by section; only the sections generation takes."""
    raw = parse_assignments(assignments)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}.*: generation takes {list(SECTIONS)}")
    return {name: raw.get(name, {}) for name in SECTIONS}


def model_config(path: str, overrides: dict) -> ModelConfig:
    """The checkpoint's config with `model.*` overrides; weights load in `model.dtype`."""
    try:
        cfg = read_config(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"--model {path}: {e}") from None
    base = {**dataclasses.asdict(cfg), "dtype": "bfloat16"}
    cfg2 = parse_section(ModelConfig, {**base, **overrides}, "model")
    changed = cfg.architecture_mismatch(cfg2)
    if changed:
        raise ConfigError(f"model.{changed}: cannot change the checkpoint's architecture")
    return cfg2.replace(param_dtype=cfg2.dtype)


def find_tokenizer(model: str, tokenizer: str | None, chat_template: str | None):
    """`tokenizer` (a directory or `qwen`), else the model directory's, else the one the
    training run's config.yaml names (`data.tokenizer`, else `rl.tokenizer`, with its chat
    template unless `chat_template` is given), else None."""
    path = tokenizer
    if path is None and any((Path(model) / f).is_file() for f in TOKENIZER_FILES):
        path = model
    if path is None and (named := run_tokenizer(model)) is not None:
        path, template, config = named
        chat_template = chat_template or template
        print(f"tokenizer: {path} (from {config})", file=sys.stderr)
    if path is None:
        if chat_template:
            raise DataError("--chat-template needs a tokenizer (--tokenizer DIR)")
        return None
    return load_tokenizer(path, chat_template)


def run_tokenizer(model: str) -> tuple[str, str | None, Path] | None:
    """(tokenizer, chat template, the config.yaml naming them) of the training run that
    `model` is (a run directory, its checkpoints/ folder or one step of it), or None. A
    relative tokenizer path is as the run's config wrote it (relative to where it ran)."""
    path = Path(model).absolute()
    if path.parent.name == "checkpoints":
        run = path.parent.parent
    elif path.name == "checkpoints":
        run = path.parent
    else:
        run = path
    config = run / "config.yaml"
    if not config.is_file():
        return None
    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        return None  # not a run's config: no tokenizer from it
    for name in ("data", "rl"):
        section = raw.get(name) if isinstance(raw, dict) else None
        if isinstance(section, dict) and section.get("tokenizer"):
            return str(section["tokenizer"]), section.get("chat_template"), config
    return None


def load_engine(
    model: str,
    assignments: list[str],
    *,
    tokenizer=None,
    slots: int,
    steps_per_call: int,
    max_len: int | None,
) -> Engine:
    """The engine over `model` (HF directory, Orbax checkpoint or run directory)."""
    by_section = sections(assignments)
    cfg = model_config(model, by_section["model"])
    # SGLang quantizes activations with exact FP32 scales (amax/448 per 1×128 tile): the
    # default here, unlike training's power-of-two scales.
    fp8 = parse_section(FP8Config, {"power_of_two_scales": False, **by_section["fp8"]}, "fp8")
    if fp8.recipe not in ("none", "blockwise"):
        raise ConfigError(f"fp8.recipe={fp8.recipe}: generation takes none or blockwise")
    parallel = parse_section(ParallelConfig, by_section["parallel"], "parallel")
    if parallel.fsdp != 1 or parallel.context != 1:
        raise ConfigError("parallel.fsdp / parallel.context: generation uses data × tensor only")
    # A mesh whenever there is more than one device or one was asked for (a mesh that does
    # not fit the devices is an error, not silently one device).
    sharded = jax.device_count() > 1 or bool(by_section["parallel"])
    layout = decode_layout(parallel) if sharded else None
    execution = parse_section(ExecutionConfig, by_section["execution"], "execution")
    params = traverse_util.unflatten_dict(load_params(model, cfg))
    return Engine(
        cfg, params, gemm=make_gemm(fp8), layout=layout, execution=execution, slots=slots,
        steps_per_call=steps_per_call, max_len=max_len or cfg.max_position_embeddings,
        tokenizer=tokenizer,
    )  # fmt: skip
