"""FP8 inference export (DeepSeek-V3 block format) from an HF directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import ROOT, make_hf_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from infir2_jax.checkpoint.fp8_export import dequantize_weight_blocks, quantize_weight_blocks
from infir2_jax.checkpoint.hf_io import hf_weight_map

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Shapes with partial 128-blocks: hidden 200, ffn 300, 4 heads x 40, 2 kv heads.
SHAPES = dict(hidden_size=200, intermediate_size=300, num_attention_heads=4,
              num_key_value_heads=2, head_dim=40, vocab_size=320)  # fmt: skip


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "converters" / "hf_to_fp8.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def _tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor as numpy (read through torch: safetensors' numpy reader lacks FP8)."""
    out = {}
    for name, file in hf_weight_map(directory).items():
        with safe_open(file, framework="pt") as f:
            t = f.get_tensor(name)
        value = t.float().numpy()
        out[name] = (
            value.astype(ml_dtypes.float8_e4m3fn) if t.dtype == torch.float8_e4m3fn else value
        )
    return out


@pytest.mark.parametrize("scale_format", ["fp32", "e8m0"])
def test_export_format_scales_and_values(tmp_path, scale_format):
    make_hf_model(tmp_path / "hf", std=0.05, **SHAPES)
    r = _export("--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "fp8"),
                "--scale-format", scale_format)  # fmt: skip
    assert r.returncode == 0, r.stderr
    original, exported = _tensors(tmp_path / "hf"), _tensors(tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["fmt"] == "e4m3"
    assert quant["activation_scheme"] == "dynamic" and quant["weight_block_size"] == [128, 128]
    assert quant["modules_to_not_convert"] == quant["ignored_layers"] == ["lm_head"]

    quantized = 0
    for name, value in original.items():
        if any(f".{p}.weight" in name for p in PROJECTIONS):
            q, s = exported[name], exported[f"{name}_scale_inv"]
            assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == np.float32
            assert s.shape == (-(-value.shape[0] // 128), -(-value.shape[1] // 128))
            for i in range(s.shape[0]):
                for j in range(s.shape[1]):
                    block = value[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                    exact = np.abs(block).max() / np.float32(448.0)
                    want = exact if scale_format == "fp32" else _pow2_ceiling(exact)
                    assert s[i, j] == np.float32(want), (name, i, j)
            deq = dequantize_weight_blocks(q, s)
            # E4M3 rounding: |error| <= 2^-4 relative for normal values, <= half the smallest
            # subnormal step (2^-10 · scale) near zero.
            bound = np.maximum(
                np.abs(value) * 2.0**-4,
                np.repeat(np.repeat(s, 128, 0), 128, 1)[: value.shape[0], : value.shape[1]]
                * 2.0**-10,
            )  # noqa: E501
            assert np.all(np.abs(deq - value) <= bound * 1.0001), name
            quantized += 1
        else:  # embeddings, lm_head, norms, biases: untouched
            np.testing.assert_array_equal(exported[name], value)
    assert quantized == 7 * 2


def test_transformers_loads_the_export_and_logits_stay_close(tmp_path):
    hf = make_hf_model(tmp_path / "hf", std=0.05, **SHAPES)
    assert _export("--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "fp8")).returncode == 0
    fp8 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")  # CPU: dequantizes on load
    ids = torch.tensor([[3, 17, 250, 9, 42, 100]])
    with torch.no_grad():
        ref = hf(ids).logits.float()
        got = fp8(ids).logits.float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel  # E4M3 weights: ~2-3% relative weight error


def test_block_quantizer_partial_blocks_and_zero_blocks():
    w = np.zeros((130, 260), np.float32)
    w[:128, 128:256] = np.linspace(-3, 3, 128 * 128).reshape(128, 128)
    w[129, 259] = 7.0
    q, s = quantize_weight_blocks(w, power_of_two=False)
    assert s.shape == (2, 3)
    assert s[0, 0] == 1.0  # all-zero block
    assert s[0, 1] == np.float32(3.0) / np.float32(448.0)
    assert s[1, 2] == np.float32(7.0) / np.float32(448.0)  # partial corner block
    assert q[129, 259].astype(np.float32) == 448.0


def _pow2_ceiling(s: float) -> float:
    """The least power of two >= s, by exact float arithmetic (no log rounding)."""
    p = 2.0 ** math.floor(math.log2(s))
    while p < s:
        p *= 2.0
    while p / 2.0 >= s:
        p /= 2.0
    return p


def test_power_of_two_scales_round_up_even_a_hair_above_a_power_of_two():
    """amax/448 a hair above 2^-13 (a typical weight scale): log2 in float32 rounds to -13.0,
    so a log-based ceiling would round the scale *down* (and the block would overflow E4M3);
    the exact ceiling is 2^-12."""
    amax = np.float32(448.0 * 2.0**-13)
    while amax / np.float32(448.0) <= 2.0**-13:
        amax = np.nextafter(amax, np.float32(1.0))
    scale = amax / np.float32(448.0)
    assert scale > 2.0**-13 and np.float32(np.log2(scale)) == -13.0  # the trap is real
    w = np.full((128, 128), 0.01, np.float32)
    w[0, 0] = amax
    q, s = quantize_weight_blocks(w, power_of_two=True)
    assert s[0, 0] == 2.0**-12 == _pow2_ceiling(float(scale))
    assert np.abs(q.astype(np.float32)).max() <= 448.0
    # One quantizer: the export and the training quantizer agree bit for bit.
    from infir2_jax.fp8.quantize import E4M3, quantize_blocks

    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 200)).astype(np.float32) * 0.02
    for power_of_two in (False, True):
        q, s = quantize_weight_blocks(w, power_of_two=power_of_two)
        tq, ts = quantize_blocks(w, (128, 128), E4M3, power_of_two=power_of_two)
        np.testing.assert_array_equal(s, np.asarray(ts))
        np.testing.assert_array_equal(q.view(np.uint8), np.asarray(tq).view(np.uint8))


def test_check_tp_names_the_projection(tmp_path):
    make_hf_model(tmp_path / "hf", **SHAPES)
    r = _export("--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o"), "--check-tp", "2")
    assert r.returncode == 2
    assert "self_attn.k_proj.weight" in r.stderr and "not a multiple of 128" in r.stderr
    assert not (tmp_path / "o").exists()
