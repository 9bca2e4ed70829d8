"""The model to serve, as an HF directory: one as given, or an Orbax checkpoint / run
directory exported into the eval run directory first (BF16, or block FP8 with
`eval.weights: fp8_block`). Exports are reused by a re-run."""

from __future__ import annotations

import json
from pathlib import Path

from infir2_jax.checkpoint.convert import orbax_to_hf
from infir2_jax.checkpoint.fp8_export import export_fp8
from infir2_jax.checkpoint.orbax_io import resolve_checkpoint_dir
from infir2_jax.config import ConfigError, EvalConfig
from infir2_jax.data.tokenizer import tokenizer_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _quantized(hf_dir: Path) -> bool:
    config = json.loads((hf_dir / "config.json").read_text())
    return "quantization_config" in config


def serving_model(path: str, cfg: EvalConfig, run_dir: Path) -> Path:
    source = Path(path)
    if (source / "config.json").is_file():
        hf_dir = source
    else:
        try:
            step = resolve_checkpoint_dir(source)
        except FileNotFoundError as e:
            raise ConfigError(f"--model {path}: {e}") from None
        hf_dir = run_dir / f"model-step{step.name}-bf16"
        if not hf_dir.is_dir():
            if cfg.tokenizer is None:
                raise ConfigError(
                    f"--model {path} is an Orbax checkpoint: eval.tokenizer (a tokenizer "
                    "directory) is needed to serve its HF export"
                )
            tokenizer = str(tokenizer_dir(cfg.tokenizer, key="eval.tokenizer"))
            print(f"exporting {step} -> {hf_dir}", flush=True)
            orbax_to_hf(step, hf_dir, dtype="bfloat16", copy_files_from=tokenizer)
    if not any((hf_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"--model {hf_dir}: no tokenizer files beside the weights")
    if cfg.weights == "fp8_block" and not _quantized(hf_dir):
        fp8_dir = run_dir / f"{hf_dir.name}-fp8"
        if not fp8_dir.is_dir():
            print(f"quantizing {hf_dir} -> {fp8_dir} (block FP8)", flush=True)
            export_fp8(hf_dir, fp8_dir)
        hf_dir = fp8_dir
    return hf_dir
