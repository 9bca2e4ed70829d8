"""Compiling for H100 without a GPU: the target description, the HLO census, and what XLA:GPU
makes of each FP8 recipe (needs the CUDA plugin, requirements-gpu-compile.txt; CI installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, plan_h100

from infir2_jax.compat import cuda_plugin, deviceless_cudnn_attention
from infir2_jax.gpu_target import census, square_buffers, target_capability, target_config

HAS_PLUGIN = cuda_plugin() is not None
needs_deviceless_cudnn = pytest.mark.skipif(
    not deviceless_cudnn_attention(),
    reason="this jax cannot compile cuDNN attention without a GPU (compat.py)",
)
needs_plugin = pytest.mark.skipif(
    not HAS_PLUGIN, reason="CUDA plugin absent: pip install -r requirements-gpu-compile.txt"
)

HLO = """
ENTRY %main (p0: bf16[64,32], p1: f8e4m3fn[32,16]) -> bf16[64,16] {
  %a = f8e4m3fn[64,32]{1,0} convert(%p0)
  %s = f32[] parameter(2)
  %g1 = (bf16[64,16]{1,0}, s8[1024]{0}) custom-call(%a, %p1, %s, %s), custom_call_target="__cublas$lt$matmul$f8"
  %g2 = (f32[64,16]{1,0}, s8[1024]{0}) custom-call(f8e4m3fn[64,32]{1,0} %a, f8e4m3fn[32,16]{1,0} %p1), custom_call_target="__cublas$lt$matmul$f8"
  %b = bf16[32,16]{1,0} parameter(3)
  %g3 = (bf16[64,16]{1,0}, s8[1024]{0}) custom-call(%p0, %b), custom_call_target="__cublas$lt$matmul"
  %f = f32[64,32]{1,0} convert(%p0)
  %g4 = (f32[64,16]{1,0}, s8[1024]{0}) custom-call(%f, %b), custom_call_target="__cublas$gemm"
  %d = f32[64,16]{1,0} dot(%f, %f), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %att = (bf16[1,4,64,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p0, %p0), custom_call_target="__cudnn$fmhaSoftmax"
  %q = (f8e4m3fn[64,32]{1,0}, f8e4m3fn[1]{0}, f32[1]{0}, f32[1]{0}, f32[1]{0}, /*index=5*/bf16[1]{0}, f32[1]{0}) custom-call(%p0, %s), custom_call_target="te_dbias_quantize_ffi"
  %qa = f8e4m3fn[64,32]{1,0} get-tuple-element(%q), index=0
  %t = (bf16[64,16]{1,0}, u8[33554688]{0}) custom-call(%qa, %s, %p1, %s), custom_call_target="te_gemm_v2_ffi"
  %bq = (f8e4m3fn[64,32]{1,0}, f32[64,1]{1,0}, f8e4m3fn[32,64]{1,0}, f32[32,1]{1,0}) custom-call(%p0), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %k = bf16[64,16]{1,0} custom-call(%p0), custom_call_target="mosaic_gpu_v2"
}
"""


def test_census_counts_each_kind_of_call():
    c = census(HLO)
    assert c.as_dict() == dict(
        fp8_gemms=3, fp8_gemms_f32_out=1, bf16_gemms=1, f32_gemms=1, xla_dots=1,
        attention_kernels=1, pallas_kernels=2, pallas_quantize=1, all_gemms=5, te_gemms=1,
        te_fp8_gemms=1, te_quantize=1,
    )  # fmt: skip


def test_square_buffers_counts_seq_by_seq_shapes():
    text = "%a = pred[2,1,384,384]{3,2,1,0} compare(...)\n%b = f32[384,128]{1,0} p\n"
    text += "%c = bf16[2,4,384,384]{3,2,1,0} x(%a)\n%d = s32[384,384]{1,0} iota()\n"
    assert square_buffers(text, 384) == 3
    assert square_buffers(text, 128) == 0


def test_target_descriptions_load_without_fields_jaxlib_rejects():
    for name in ("h100", "h200"):
        text = target_config(name)
        assert "collective_memory_granularity" not in text
        assert 'runtime_version: "12.8.0"' in text  # else XLA drops the FP8 GEMM rewrite
        assert "major: 9" in text  # Hopper
        assert target_capability(name) == (9, 0)


@pytest.fixture(scope="module")
def h100_plans() -> dict[str, dict]:
    recipes = ("none", "current", "delayed", "blockwise")
    return {recipe: plan_h100(f"fp8.recipe={recipe}") for recipe in recipes}


@needs_plugin
def test_bf16_step_has_no_fp32_gemms(h100_plans):
    c = h100_plans["none"]["census"]
    assert c["fp8_gemms"] == 0 and c["f32_gemms"] == 0  # the loss backward included
    assert c["bf16_gemms"] > 0


@needs_plugin
@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_per_tensor_recipes_compile_to_fused_fp8_gemms(h100_plans, recipe):
    """Every projection GEMM is a cuBLASLt FP8 GEMM that takes both scales and writes BF16:
    7 fprop in the forward body; 6 recomputed fprop (down's output is not needed) + 7 dgrad +
    7 wgrad in the backward body. No FP32 [tokens, out] product, no FP32-operand GEMM, and no
    more memory than BF16."""
    plan, bf16 = h100_plans[recipe], h100_plans["none"]
    c = plan["census"]
    assert c["fp8_gemms"] == 27, c
    assert c["fp8_gemms_f32_out"] == 0 and c["f32_gemms"] == 0, c
    # Less the recipe's own state: delayed's amax histories (3 × 1024 per GEMM) are 1.7% of
    # this tiny model (0.3 MB; nothing at 1.5B), and jax 0.12 no longer offsets them with
    # smaller temporaries as jax 0.10.2 did.
    assert plan["peak"] - plan["fp8_state"] <= bf16["peak"] * 1.01, (plan["peak"], bf16["peak"])


@needs_plugin
def test_blockwise_compiles_to_the_pallas_kernel(h100_plans):
    """InfiR2's recipe on H100: all 27 projection GEMMs of the two layer bodies are our Pallas
    Mosaic GPU kernel; no cuBLAS GEMM is left with FP8 or FP32 operands (the emulation would
    show 27 FP32 GEMMs). Each GEMM input x and output gradient g is quantized by one Triton
    kernel (both FP8 copies): 4 inputs (q/k/v's, o's, gate/up's, and down's, which the kernel
    computes from gate and up) in the forward body; the same 4 recomputed and 6 gradients in
    the backward body (q's, k's, v's, o's, down's, and gate's with up's from one kernel)."""
    c = h100_plans["blockwise"]["census"]
    assert c["pallas_kernels"] == 27 + 14 and c["pallas_quantize"] == 14, c
    assert c["fp8_gemms"] == 0 and c["f32_gemms"] == 0, c


# Attention: seq 384 differs from every other dimension, so [384, 384] can only be scores,
# masks or index comparisons.
SEQ = ["train.seq_len=384", "execution.remat=none"]


@needs_plugin
@needs_deviceless_cudnn
def test_auto_attention_is_cudnn_flash_attention_on_hopper_with_no_seq_by_seq_buffer():
    """`auto` on an H100: cuDNN flash attention over the packed rows (one forward, one
    backward call per layer body), and no [seq, seq] buffer of any dtype anywhere; the
    explicit-mask XLA path, for contrast, holds several."""
    flash = plan_h100(*SEQ, "execution.attention_impl=auto")
    assert flash["attention"] == "cudnn"
    assert flash["census"]["attention_kernels"] == 2, flash["census"]
    assert flash["census"]["seq_by_seq_buffers"] == 0, flash["census"]
    masked = plan_h100(*SEQ, "execution.attention_impl=xla")
    assert masked["census"]["seq_by_seq_buffers"] > 0
    assert flash["peak"] < masked["peak"]


@needs_plugin
@pytest.mark.skipif(deviceless_cudnn_attention(), reason="this jax compiles cuDNN attention")
def test_a_cudnn_plan_this_jax_cannot_compile_says_what_to_do():
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.plan", "--config", "tiny_cpt", "--target", "h100",
         "--set", "train.seq_len=384", "--set", "execution.attention_impl=auto"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot compile cuDNN flash attention without a GPU" in r.stderr
    assert "execution.attention_impl=pallas" in r.stderr


@needs_plugin
@needs_deviceless_cudnn
def test_cudnn_attention_under_tensor_parallelism_with_one_row_per_device():
    """Heads split over 2 devices, one row: the call is partitioned by hand (JAX's own rule
    for the packed call fails Shardy's verifier with one row, jax 0.10.2)."""
    plan = plan_h100(
        *SEQ, "execution.attention_impl=cudnn", "parallel.tensor=2", "parallel.data=1",
        "model.vocab_size=258",
        "train.batch_size=1", devices=2,
    )  # fmt: skip
    assert plan["census"]["attention_kernels"] == 2, plan["census"]
    assert plan["census"]["seq_by_seq_buffers"] == 0, plan["census"]


@needs_plugin
def test_pallas_flash_attention_compiles_for_hopper_alone_and_under_context_parallelism():
    """The Pallas kernel lowered for an H100 (Triton): forward, dK/dV and dQ kernels, no
    [seq, seq] buffer; `auto` picks it under context parallelism, where cuDNN's packed form
    does not apply."""
    alone = plan_h100(*SEQ, "execution.attention_impl=pallas")
    assert alone["attention"] == "pallas"
    assert alone["census"]["pallas_kernels"] == 3, alone["census"]
    assert alone["census"]["seq_by_seq_buffers"] == 0, alone["census"]
    context = plan_h100(
        *SEQ, "execution.attention_impl=auto", "parallel.context=2", "parallel.data=1",
        "execution.attention_block=64",
        "train.batch_size=1", devices=2,
    )  # fmt: skip
    assert context["attention"] == "pallas"
    assert context["census"]["pallas_kernels"] == 3, context["census"]
    assert context["census"]["attention_kernels"] == 0, context["census"]


@needs_plugin
def test_decode_loop_on_hopper_holds_no_copy_of_the_kv_cache():
    """The jitted decode loop compiled for an H100: its temporaries do not grow with the
    cache (4× longer cache, same temp bytes): the cache is read and appended in place, with
    no transposed copy at the loop boundary and no per-layer slice copy per step."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "decode_compile.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    sizes = json.loads(r.stdout.strip().splitlines()[-1])
    short, long = sizes["1024"], sizes["4096"]
    assert short["xla_gpu"] and long["xla_gpu"]
    assert long["cache_bytes"] == 4 * short["cache_bytes"]
    # (Not also below the short cache's bytes: from jax 0.12 XLA counts its fixed 32 MiB
    # cuBLAS workspace among the temporaries.)
    assert long["temp_bytes"] == short["temp_bytes"], sizes
