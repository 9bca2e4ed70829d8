"""BF16/FP32 HF checkpoint -> FP8 inference checkpoint in the DeepSeek-V3 block format.

Each projection weight `X.weight` [out, in] of the decoder layers (q, k, v, o, gate, up, down)
becomes float8_e4m3fn plus `X.weight_scale_inv` (float32, [ceil(out/128), ceil(in/128)]), the
dequantization multiplier per 128×128 block: exactly amax/448 (`fp32`) or its power-of-two
ceiling (`e8m0`). Embeddings, lm_head, norms and biases are copied unchanged. Quantizes with
the training quantizer on the host CPU, one input shard at a time.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from infir2_jax.checkpoint.hf_io import (
    SAFETENSORS_INDEX,
    atomic_output_dir,
    check_fresh_output_dir,
    checked_tensor,
    copy_tokenizer_files,
    hf_weight_map,
    read_hf_config,
)
from infir2_jax.checkpoint.hf_mapping import RULES
from infir2_jax.fp8.quantize import E4M3, dequantize_blocks, quantize_blocks
from infir2_jax.model.config import ModelConfig, to_hf_config

BLOCK = 128
# Projections (per-layer nn.Linear weights) and how tensor parallelism splits them:
# column-parallel layers split the output dim, row-parallel ones the input dim.
ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
SKIPPED_MODULES = ["lm_head"]  # Linear modules left unquantized (named for inference engines)


def quantized_names(cfg: ModelConfig) -> set[str]:
    """HF names of the weights that become FP8: the per-layer Linear weights of the table."""
    return {n for r in RULES if r.per_layer and r.transpose for n in r.hf_names(cfg)}


@functools.partial(jax.jit, static_argnames=("power_of_two", "block"))
def _quantize_weight(w: jax.Array, power_of_two: bool, block: int) -> tuple[jax.Array, jax.Array]:
    return quantize_blocks(w, (block, block), E4M3, power_of_two=power_of_two)


def quantize_weight_blocks(
    w: np.ndarray, *, power_of_two: bool, block: int = BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """(q float8_e4m3fn [out, in], scale_inv float32 [ceil(out/B), ceil(in/B)]): the training
    quantizer (fp8/quantize.py) on B×B blocks, so an export rounds exactly as training does,
    power-of-two ceilings included."""
    q, scale = _quantize_weight(jnp.asarray(w, jnp.float32), power_of_two, block)
    return np.asarray(q), np.asarray(scale)


def dequantize_weight_blocks(
    q: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK
) -> np.ndarray:
    return np.asarray(dequantize_blocks(jnp.asarray(q), jnp.asarray(scale_inv), (block, block)))


def tensor_parallel_problems(cfg: ModelConfig, ranks: int) -> list[str]:
    """Projections whose per-rank partition under `ranks`-way TP is not a multiple of 128."""
    if ranks <= 1:
        return []  # unsplit: partial edge blocks are fine
    problems = []
    shapes = {
        "self_attn.q_proj.weight": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
        "self_attn.k_proj.weight": (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size),
        "self_attn.o_proj.weight": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
        "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
        "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
        "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
    }
    for name, (out, inp) in shapes.items():
        split = inp if name in ROW_PARALLEL else out
        if split % ranks or (split // ranks) % BLOCK:
            dim = "in" if name in ROW_PARALLEL else "out"
            problems.append(
                f"{name}: {dim} dim {split} / {ranks} ranks = {split / ranks:g}, "
                f"not a multiple of {BLOCK}"
            )
    return problems


def max_tensor_parallel(cfg: ModelConfig, candidates: tuple[int, ...] = (1, 2, 4, 8)) -> int:
    """The largest TP size in `candidates` at which every projection splits into 128s."""
    return max(n for n in candidates if not tensor_parallel_problems(cfg, n))


def export_fp8(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    scale_format: str = "fp32",
    check_tp: int | None = None,
) -> Path:
    """Writes the FP8 checkpoint. With `check_tp`, a projection that does not split into
    128-multiples across that many inference ranks is an error and nothing is written."""
    if scale_format not in ("fp32", "e8m0"):
        raise ValueError(f"--scale-format must be fp32 or e8m0, got {scale_format!r}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = read_hf_config(hf_dir)
    check_fresh_output_dir(out_dir)
    problems = tensor_parallel_problems(cfg, check_tp) if check_tp else []
    if problems:
        raise ValueError(
            f"{check_tp}-way tensor parallel inference needs 128-multiples per rank:\n  "
            + "\n  ".join(problems)
        )
    weight_map = hf_weight_map(hf_dir)
    targets = quantized_names(cfg)
    missing = sorted(targets - set(weight_map))
    if missing:
        raise ValueError(f"{hf_dir}: missing projection weights, e.g. {missing[:3]}")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in weight_map.items():
        by_file[file].append(name)

    with atomic_output_dir(out_dir) as tmp:
        files = sorted(by_file)
        new_map, total = {}, 0
        for i, file in enumerate(files):  # one input shard in memory at a time
            shard_name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            shard = {}
            with safe_open(file, framework="numpy") as f:
                for name in sorted(by_file[file]):
                    tensor = checked_tensor(f, name, file)
                    if name in targets:
                        q, s = quantize_weight_blocks(tensor, power_of_two=scale_format == "e8m0")
                        shard[name], shard[f"{name}_scale_inv"] = q, s
                    else:
                        shard[name] = tensor
            save_file(shard, tmp / shard_name, metadata={"format": "pt"})
            for name, tensor in shard.items():
                new_map[name] = shard_name
                total += tensor.nbytes
            del shard
        index = {"metadata": {"total_size": total}, "weight_map": new_map}
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        with open(hf_dir / "config.json") as f:
            source = json.load(f)
        config = to_hf_config(cfg, source.get("torch_dtype") or source.get("dtype") or "bfloat16")
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": list(SKIPPED_MODULES),
            "ignored_layers": list(SKIPPED_MODULES),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(hf_dir, tmp)
    return out_dir
