"""Reading and writing Hugging Face Qwen2 checkpoint directories, one tensor at a time."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from infir2_jax.checkpoint.hf_mapping import (
    IGNORED_HF_SUFFIXES,
    ParamPath,
    active_rules,
    check_rules_cover_model,
    hf_shape,
    to_hf_tensors,
)
from infir2_jax.errors import CheckpointError
from infir2_jax.model.config import ModelConfig, from_hf_config, to_hf_config

# Files copied verbatim from a source HF directory next to converted weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_hf_config(hf_dir: str | os.PathLike, **overrides: Any) -> ModelConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a Hugging Face model directory?)")
    with open(path) as f:
        return from_hf_config(json.load(f), **overrides)


def hf_weight_map(hf_dir: str | os.PathLike) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (sharded index or a single file). An
    index that is not valid JSON, or that names a file outside `hf_dir`, is refused."""
    hf_dir = Path(hf_dir)
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(name): hf_dir / str(file) for name, file in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        root = hf_dir.resolve()
        for file in sorted(set(files.values())):
            if not file.resolve().is_relative_to(root):
                raise CheckpointError(f"{index}: shard {file} is outside the model directory")
            if not file.is_file():
                raise FileNotFoundError(f"{file}: listed in {index} but missing")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(
        f"{hf_dir}: no {SAFETENSORS_INDEX} or model.safetensors (only safetensors are supported)"
    )


# safetensors dtype names of the floating formats a checkpoint's weights may be stored in.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def checked_tensor(f, name: str, file: Path) -> np.ndarray:
    """Tensor `name` of the open safetensors `f`, refused (naming it) unless it is floating
    point and every value is finite: a NaN weight would poison every step trained on it."""
    stored = f.get_slice(name).get_dtype()
    if stored not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{file}: tensor {name} is stored as {stored}; weights must be one of {FLOAT_DTYPES}"
        )
    tensor = f.get_tensor(name)
    bad = tensor.size - int(np.count_nonzero(np.isfinite(tensor)))
    if bad:
        raise CheckpointError(f"{file}: tensor {name} has {bad:,} non-finite values (NaN/inf)")
    return tensor


def read_hf_params(
    hf_dir: str | os.PathLike, cfg: ModelConfig, dtype: np.dtype | str = np.float32
) -> dict[ParamPath, np.ndarray]:
    """Our flat parameter dict from an HF directory, with strict name and shape checks.

    Streams: tensors are read one at a time straight into the (stacked) destination arrays, so
    peak host memory is the parameters once in `dtype` plus the largest single tensor.
    """
    dtype = np.dtype(dtype)
    shapes = check_rules_cover_model(cfg)
    weight_map = hf_weight_map(hf_dir)
    rules = {
        name: (rule, i) for rule in active_rules(cfg) for i, name in enumerate(rule.hf_names(cfg))
    }

    missing = sorted(set(rules) - set(weight_map))
    if missing:
        raise CheckpointError(
            f"{hf_dir}: {len(missing)} tensor(s) the model needs are missing, e.g. {missing[:3]}"
        )
    unexpected = sorted(
        name
        for name in set(weight_map) - set(rules)
        if not name.endswith(IGNORED_HF_SUFFIXES)
        and not (cfg.tie_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise CheckpointError(
            f"{hf_dir}: {len(unexpected)} tensor(s), e.g. {unexpected[:3]}, are not in a Qwen2 "
            "model of this config (tie_word_embeddings / num_hidden_layers mismatch?)"
        )

    params = {rule.path: np.empty(shapes[rule.path], dtype) for rule, _ in rules.values()}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in rules:
        by_file[weight_map[name]].append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(file, framework="numpy") as f:
            for name in names:
                rule, layer = rules[name]
                expected = hf_shape(rule, shapes[rule.path])
                got = tuple(f.get_slice(name).get_shape())
                if got != expected:
                    raise CheckpointError(
                        f"{file}: tensor {name} has shape {got}, the config expects {expected}"
                    )
                tensor = checked_tensor(f, name, file)
                if rule.transpose:
                    tensor = tensor.T
                if rule.per_layer:
                    params[rule.path][layer] = tensor
                else:
                    params[rule.path][...] = tensor
    return params


def check_fresh_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: already exists and is not empty; refusing to overwrite")


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yields a temporary sibling directory that becomes `out_dir` only if the body succeeds;
    an existing non-empty `out_dir` is refused, a failed write leaves nothing behind."""
    check_fresh_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the output is a normal directory
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(src: str | os.PathLike, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


def write_hf_checkpoint(
    params: Mapping[ParamPath, Any],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: np.dtype | str = "bfloat16",
    max_shard_bytes: int = 5 * 1024**3,
    copy_files_from: str | os.PathLike | None = None,
) -> Path:
    """Writes sharded safetensors + index + config.json that `transformers` loads.

    Tensors are converted and written one shard at a time; the directory appears atomically
    (written under a temporary name, then renamed), and an existing one is never overwritten.
    """
    out_dir = Path(out_dir)
    check_fresh_output_dir(out_dir)
    np_dtype = np.dtype(dtype)
    shapes = check_rules_cover_model(cfg)
    for path, shape in shapes.items():
        got = tuple(np.shape(params[path])) if path in params else None
        if got != shape:
            raise CheckpointError(f"parameter {'/'.join(path)}: shape {got}, expected {shape}")

    # Plan shards up front from shapes so file names can carry the total count.
    shard_of: dict[str, int] = {}
    sizes = [0]
    for rule in active_rules(cfg):
        nbytes = int(np.prod(hf_shape(rule, shapes[rule.path]))) * np_dtype.itemsize
        for name in rule.hf_names(cfg):
            if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                sizes.append(0)
            sizes[-1] += nbytes
            shard_of[name] = len(sizes) - 1
    n = len(sizes)
    file_name = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    with atomic_output_dir(out_dir) as tmp:
        shard: dict[str, np.ndarray] = {}
        current = 0
        for name, tensor in to_hf_tensors(params, cfg, np_dtype):
            if shard_of[name] != current:
                save_file(shard, tmp / file_name[current], metadata={"format": "pt"})
                shard, current = {}, shard_of[name]
            shard[name] = tensor
        save_file(shard, tmp / file_name[current], metadata={"format": "pt"})
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {name: file_name[i] for name, i in shard_of.items()},
        }
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg, np_dtype.name), indent=2))
        if copy_files_from is not None:
            copy_tokenizer_files(copy_files_from, tmp)
    return out_dir
