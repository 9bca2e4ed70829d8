"""The planner's projected step time (infir2_jax/roofline.py): the HLO parsing on synthetic text
and on programs compiled for H100s without a GPU, and the projection of a tiny train step."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import plan_h100

from infir2_jax import roofline
from infir2_jax.compat import cuda_plugin, deviceless_cudnn_attention
from infir2_jax.config import load_config
from infir2_jax.gpu_target import PEAKS, target_config

needs_plugin = pytest.mark.skipif(
    cuda_plugin() is None, reason="CUDA plugin absent: pip install -r requirements-gpu-compile.txt"
)
H100 = PEAKS["h100"]
GEMM_RATE = {"bf16": H100.bf16_flops, "fp8": H100.fp8_flops}
HBM = H100.hbm_bytes * roofline.MEMORY_EFFICIENCY
NVLINK = H100.nvlink_bytes * roofline.COLLECTIVE_EFFICIENCY
CUBLAS_CONFIG = (
    'backend_config={"gemm_backend_config":{"dot_dimension_numbers":{'
    '"lhs_contracting_dimensions":["%s"],"rhs_contracting_dimensions":["%s"],'
    '"lhs_batch_dimensions":[%s],"rhs_batch_dimensions":[%s]}}}'
)

# An outer loop of 3 trips (known_trip_count) around an inner loop whose bound is only in its
# condition (i < 5, from 0), each with a GEMM; a fusion holding a dot, a slicing fusion, the
# kinds of quantization kernels, collectives in three replica-group notations, a conditional.
SYNTHETIC = """HloModule synthetic, is_scheduled=true, num_partitions=8

%max (a: s16[], b: s16[]) -> s16[] {
  %a = s16[] parameter(0)
  %b = s16[] parameter(1)
  ROOT %m = s16[] maximum(%a, %b)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_less (p: s32[]) -> pred[] {
  %p = s32[] parameter(0)
  %bound = s32[] constant(5)
  ROOT %lt = pred[] compare(%p, %bound), direction=LT
}

%inner_cond (t: (s32[], bf16[256,512])) -> pred[] {
  %t = (s32[], bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %c = pred[] fusion(%i), kind=kLoop, calls=%inner_less
}

%inner_body (t: (s32[], bf16[256,512])) -> (s32[], bf16[256,512]) {
  %t = (s32[], bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[256,512]{1,0} get-tuple-element(%t), index=1
  %w = bf16[1024,512]{1,0} constant({...})
  %inner_gemm = (bf16[256,1024]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", CONFIG_NT
  ROOT %r = (s32[], bf16[256,512]{1,0}) tuple(%i, %x)
}

%outer_cond (t: (s32[], bf16[256,512])) -> pred[] {
  %t = (s32[], bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (t: (s32[], bf16[256,512])) -> (s32[], bf16[256,512]) {
  %t = (s32[], bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[256,512]{1,0} get-tuple-element(%t), index=1
  %a = f8e4m3fn[256,512]{1,0} parameter(1)
  %b = f8e4m3fn[768,512]{1,0} parameter(2)
  %s = f32[] parameter(3)
  %fp8_gemm = (bf16[256,768]{1,0}, s8[1024]{0}) custom-call(%a, %b, %s, %s), custom_call_target="__cublas$lt$matmul$f8", CONFIG_NT
  %zero = s32[] constant(0)
  %start = (s32[], bf16[256,512]{1,0}) tuple(%zero, %x)
  %inner = (s32[], bf16[256,512]{1,0}) while(%start), condition=%inner_cond, body=%inner_body
  ROOT %r = (s32[], bf16[256,512]{1,0}) tuple(%i, %x)
}

%dot_body (p0: bf16[8,128,64], p1: bf16[8,64,32]) -> bf16[8,128,32] {
  %p0 = bf16[8,128,64]{2,1,0} parameter(0)
  %p1 = bf16[8,64,32]{2,1,0} parameter(1)
  ROOT %d = bf16[8,128,32]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

%slice_body (p0: f32[16,1024], p1: s32[], p2: f32[16,1024], p3: f32[1,1024]) -> (f32[1,1024], f32[16,1024]) {
  %p0 = f32[16,1024]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = f32[16,1024]{1,0} parameter(2)
  %p3 = f32[1,1024]{1,0} parameter(3)
  %z = s32[] constant(0)
  %v = f32[16,1024]{1,0} bitcast(%p0)
  %row = f32[1,1024]{1,0} dynamic-slice(%v, %p1, %z), dynamic_slice_sizes={1,1024}
  %upd = f32[16,1024]{1,0} dynamic-update-slice(%p2, %p3, %p1, %z)
  ROOT %t = (f32[1,1024]{1,0}, f32[16,1024]{1,0}) tuple(%row, %upd)
}

%cast_body (p0: bf16[512,512]) -> (f8e4m3fn[512,512], f32[]) {
  %p0 = bf16[512,512]{1,0} parameter(0)
  %c = f8e4m3fn[512,512]{1,0} convert(%p0)
  %scale = f32[] constant(1)
  ROOT %t = (f8e4m3fn[512,512]{1,0}, f32[]) tuple(%c, %scale)
}

%mixed_body (p0: bf16[512,512]) -> (bf16[512,512], s16[512,512]) {
  %p0 = bf16[512,512]{1,0} parameter(0)
  %n = bf16[512,512]{1,0} negate(%p0)
  %abs = bf16[512,512]{1,0} abs(%n)
  %bits = s16[512,512]{1,0} bitcast(%abs)
  ROOT %t = (bf16[512,512]{1,0}, s16[512,512]{1,0}) tuple(%n, %bits)
}

%amax_body (p0: bf16[512,512]) -> s16[] {
  %p0 = bf16[512,512]{1,0} parameter(0)
  %abs = bf16[512,512]{1,0} abs(%p0)
  %bits = s16[512,512]{1,0} bitcast-convert(%abs)
  %init = s16[] constant(0)
  ROOT %r = s16[] reduce(%bits, %init), dimensions={0,1}, to_apply=%max
}

%upcast_body (p0: f8e4m3fn[512,512]) -> bf16[512,512] {
  %p0 = f8e4m3fn[512,512]{1,0} parameter(0)
  ROOT %c = bf16[512,512]{1,0} convert(%p0)
}

%plain_body (p0: bf16[512,512]) -> bf16[512,512] {
  %p0 = bf16[512,512]{1,0} parameter(0)
  ROOT %n = bf16[512,512]{1,0} negate(%p0)
}

%scatter_comp (p: f32[1024,256]) -> f32[256,256] {
  %p = f32[1024,256]{1,0} parameter(0)
  ROOT %reduce_scatter = f32[256,256]{1,0} reduce-scatter(%p), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}

%big_branch (x: bf16[512,512]) -> bf16[512,512] {
  %x = bf16[512,512]{1,0} parameter(0)
  ROOT %big = bf16[512,512]{1,0} fusion(%x), kind=kLoop, calls=%plain_body
}

%small_branch (x: bf16[512,512]) -> bf16[512,512] {
  ROOT %x = bf16[512,512]{1,0} parameter(0)
}

ENTRY %main (p0: bf16[256,512], p1: bf16[8,128,64], p2: bf16[8,64,32]) -> bf16[512,512] {
  %p0 = bf16[256,512]{1,0} parameter(0)
  %p1 = bf16[8,128,64]{2,1,0} parameter(1)
  %p2 = bf16[8,64,32]{2,1,0} parameter(2)
  %zero = s32[] constant(0)
  %start = (s32[], bf16[256,512]{1,0}) tuple(%zero, %p0)
  %outer = (s32[], bf16[256,512]{1,0}) while(%start), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0","step":"1"}}
  %dot_fusion = bf16[8,128,32]{2,1,0} fusion(%p1, %p2), kind=kCustom, calls=%dot_body
  %f32_gemm = (f32[128,32]{1,0}, s8[1024]{0}) custom-call(f32[128,64]{1,0} %q, f32[32,64]{1,0} %k), custom_call_target="__cublas$gemm", CONFIG_NT
  %q = f32[128,64]{1,0} parameter(3)
  %k = f32[32,64]{1,0} parameter(4)
  %table = f32[16,1024]{1,0} parameter(5)
  %index = s32[] parameter(6)
  %new_row = f32[1,1024]{1,0} parameter(7)
  %slicing = (f32[1,1024]{1,0}, f32[16,1024]{1,0}) fusion(%table, %index, %table, %new_row), kind=kLoop, calls=%slice_body
  %h = bf16[512,512]{1,0} parameter(8)
  %cast = (f8e4m3fn[512,512]{1,0}, f32[]) fusion(%h), kind=kLoop, calls=%cast_body
  %cast_values = f8e4m3fn[512,512]{1,0} get-tuple-element(%cast), index=0
  %amax = s16[] fusion(%h), kind=kInput, calls=%amax_body
  %upcast = bf16[512,512]{1,0} fusion(%cast_values), kind=kLoop, calls=%upcast_body
  %mixed = (bf16[512,512]{1,0}, s16[512,512]{1,0}) fusion(%h), kind=kLoop, calls=%mixed_body
  %plain = bf16[512,512]{1,0} fusion(%h), kind=kLoop, calls=%plain_body
  %grads = f32[1024,256]{1,0} parameter(9)
  %all_reduce = f32[1024,256]{1,0} all-reduce-start(%grads), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %all_reduce_done = f32[1024,256]{1,0} all-reduce-done(%all_reduce)
  %all_gather = f32[8192,256]{1,0} all-gather(%grads), replica_groups={}, dimensions={0}
  %rs_start = ((f32[1024,256]{1,0}), f32[256,256]{1,0}) async-start(%grads), calls=%scatter_comp
  %rs_done = f32[256,256]{1,0} async-done(%rs_start)
  %which = pred[] parameter(10)
  ROOT %branch = bf16[512,512]{1,0} conditional(%which, %h, %h), true_computation=%small_branch, false_computation=%big_branch
}
""".replace("CONFIG_NT", CUBLAS_CONFIG % ("1", "1", "", ""))


@pytest.fixture(scope="module")
def projection() -> roofline.Projection:
    return roofline.project(SYNTHETIC, "h100")


@pytest.fixture(scope="module")
def synthetic(projection) -> dict[str, roofline.Kernel]:
    """The synthetic module's kernels that run, by name."""
    return {k.name: k for k in projection.kernels}


def test_peaks_agree_with_the_target_files_and_the_h200_differs_in_its_hbm():
    for name in ("h100", "h200"):
        found = re.search(r"memory_bandwidth:\s*(\d+)", target_config(name))
        assert PEAKS[name].hbm_bytes == pytest.approx(float(found.group(1)), rel=1e-3)
    assert PEAKS["h100"].fp8_flops == 2 * PEAKS["h100"].bf16_flops
    # the H200 differs in its HBM: memory-bound kernels only run faster
    h200 = {k.name: k for k in roofline.project(SYNTHETIC, "h200").kernels}
    h100 = {k.name: k for k in roofline.project(SYNTHETIC, "h100").kernels}
    assert h100["plain"].seconds / h200["plain"].seconds == pytest.approx(4.8 / 3.35)
    assert h200["fp8_gemm"].flops == h100["fp8_gemm"].flops


def test_parser_reads_tuple_types_and_typed_operands():
    line = (
        "  ROOT %g = (bf16[64,16]{1,0}, /*index=1*/s8[1024]{0}) custom-call(bf16[64,32]{1,0} "
        '%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"x":{"y":"1"}}'
    )
    i = roofline.parse_instruction(line)
    assert (i.name, i.opcode, i.operands, i.is_root) == ("g", "custom-call", ["a", "b"], True)
    assert [str(a) for a in i.result] == ["bf16[64,16]", "s8[1024]"]
    assert i.target == "__cublas$lt$matmul" and i.backend_config() == {"x": {"y": "1"}}


def test_nested_loops_multiply_execution_counts(projection, synthetic):
    loops = {loop["name"]: loop for loop in projection.loops}
    assert loops["outer"] == dict(name="outer", trips=3, times=1.0, how="known_trip_count")
    assert loops["inner"]["trips"] == 5 and loops["inner"]["times"] == 3.0
    assert loops["inner"]["how"] == "condition LT 5"
    assert synthetic["fp8_gemm"].count == 3  # the outer body
    assert synthetic["inner_gemm"].count == 15  # 3 × 5
    assert synthetic["c"].count == 3 * 6  # a condition runs once more than its body
    assert synthetic["lt"].count == 3 + 1  # the outer condition's (unfused) compare
    assert synthetic["dot_fusion"].count == 1


def test_gemm_shapes_dtypes_and_times(synthetic):
    fp8, bf16 = synthetic["fp8_gemm"], synthetic["inner_gemm"]
    assert fp8.category == "gemm_fp8" and fp8.flops == 2 * 256 * 768 * 512
    assert "M256 N768 K512 f8e4m3fnxf8e4m3fn" in fp8.detail
    assert bf16.category == "gemm_bf16" and bf16.flops == 2 * 256 * 1024 * 512
    # bytes: both matrices and the product, not the workspace
    assert bf16.bytes == 2 * (256 * 512 + 1024 * 512 + 256 * 1024)
    compute = bf16.flops / (GEMM_RATE["bf16"] * roofline.GEMM_EFFICIENCY)
    assert bf16.seconds == pytest.approx(max(compute, bf16.bytes / HBM))
    dot = synthetic["dot_fusion"]  # batched: B8 M128 N32 K64
    assert dot.category == "gemm_bf16" and dot.flops == 2 * 8 * 128 * 32 * 64
    f32 = synthetic["f32_gemm"]
    assert f32.category == "gemm_fp32" and f32.flops == 2 * 128 * 32 * 64


def test_memory_kernels_read_slices_and_write_updates(synthetic):
    # reads a row of one table, the index and the new row; writes the row read and the new row
    # into the other table (in place)
    slicing = synthetic["slicing"]
    assert slicing.category == "memory"
    assert slicing.bytes == 4 * 1024 + 4 + 4 * 1024 + 4 * 1024 + 4 * 1024
    assert slicing.seconds == pytest.approx(slicing.bytes / HBM)
    plain = synthetic["plain"]
    assert plain.category == "memory" and plain.bytes == 2 * 2 * 512 * 512


def test_quantization_kernels(projection, synthetic):
    for name in ("cast", "amax", "upcast"):
        assert synthetic[name].category == "quantization", name
        assert synthetic[name].quantization_seconds == synthetic[name].seconds
    assert synthetic["cast"].bytes == 3 * 512 * 512 + 4  # BF16 in, FP8 and a scale out
    assert synthetic["amax"].bytes == 2 * 512 * 512 + 2
    # BF16's negation with |x|'s bit patterns written beside it: FP8's by the bits' third
    mixed = synthetic["mixed"]
    assert mixed.category == "memory" and mixed.bytes == 3 * 2 * 512 * 512
    assert mixed.quantization_seconds == pytest.approx(mixed.seconds / 3)
    assert synthetic["plain"].quantization_seconds == 0
    pure = sum(synthetic[name].seconds for name in ("cast", "amax", "upcast"))
    assert projection.breakdown["quantization"] == pytest.approx(pure + mixed.seconds / 3)


def test_collective_group_sizes_and_ring_times(synthetic):
    size = 4 * 1024 * 256  # the f32[1024, 256] operand
    all_reduce, all_gather = synthetic["all_reduce"], synthetic["all_gather"]
    assert "over 4 devices" in all_reduce.detail  # {{0,1,2,3},{4,5,6,7}}
    assert all_reduce.seconds == pytest.approx(2 * 3 / 4 * size / NVLINK)
    assert "over 8 devices" in all_gather.detail  # {}: every partition
    assert all_gather.seconds == pytest.approx(7 / 8 * 8 * size / NVLINK)
    scatter = synthetic["reduce_scatter"]  # inside async-start; iota groups [2,4]<=[8]
    assert scatter.category == "collective" and scatter.count == 1
    assert "over 4 devices" in scatter.detail
    assert scatter.seconds == pytest.approx(3 / 4 * size / NVLINK)
    assert "all_reduce_done" not in synthetic and "rs_done" not in synthetic
    ring = roofline.Instruction("x", "all-gather", [], [], ", replica_groups=[4,2]<=[8]", "", False)
    assert roofline.group_size(ring, 8) == 2
    # The mesh notation of recent XLA: the named axes' sizes multiplied.
    head = ", replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] {'axis_0','axis_2'}, x"
    meshed = roofline.Instruction("x", "all-gather", [], [], head, "", False)
    assert roofline.group_size(meshed, 8) == 4


def test_conditional_runs_its_most_expensive_branch_and_launches_add_up(projection, synthetic):
    assert synthetic["big"].count == 1
    breakdown = projection.breakdown
    assert breakdown["launch"] == pytest.approx(projection.launches * roofline.LAUNCH_SECONDS)
    every = sum(k.seconds * k.count for k in projection.kernels) + breakdown["launch"]
    assert projection.seconds == pytest.approx(every)
    figures = projection.as_dict()
    assert figures["total_ms"] == pytest.approx(projection.seconds * 1e3)
    assert figures["mfu"] is None  # no model FLOPs given
    top = figures["top_kernels"][0]
    assert top["ms_per_step"] == max(k["ms_per_step"] for k in figures["top_kernels"])


def test_a_triton_collective_fusion_is_timed_as_its_collective():
    """Recent XLA runs small all-reduces as `__triton_collective` fusions (fusion-start /
    fusion-done): one collective, launched once, timed by the ring formula."""
    hlo = """HloModule fused_collective, num_partitions=8
%region (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}
%fused_psum (p: f32[128,128]) -> f32[128,128] {
  %p = f32[128,128]{1,0} parameter(0)
  ROOT %psum = f32[128,128]{1,0} all-reduce(%p), channel_id=1, replica_groups=mesh['a'=2,'b'=4] {'b'}, to_apply=%region
}
ENTRY %main (x: f32[128,128]) -> f32[128,128] {
  %x = f32[128,128]{1,0} parameter(0)
  %fusion-start = ((f32[128,128]{1,0}), f32[128,128]{1,0}) fusion-start(%x), kind=kCustom, calls=%fused_psum, backend_config={"fusion_backend_config":{"kind":"__triton_collective"}}
  ROOT %fusion-done = f32[128,128]{1,0} fusion-done(%fusion-start)
}
"""
    projection = roofline.project(hlo, "h100")
    (kernel,) = projection.kernels
    assert (kernel.name, kernel.category, kernel.count) == ("fusion-start", "collective", 1)
    assert "all-reduce" in kernel.detail and "over 4 devices" in kernel.detail
    assert kernel.seconds == pytest.approx(2 * 3 / 4 * 4 * 128 * 128 / NVLINK)
    assert projection.launches == 1


def test_attention_and_transformer_engine_calls():
    """cuDNN forward / backward, a Pallas flash-attention dK/dV kernel (grouped K/V), TE's
    GEMM and quantize calls."""
    hlo = """HloModule attention
ENTRY %main (q: bf16[2,384,4,32], k: bf16[2,384,4,32]) -> bf16[64,16] {
  %q = bf16[2,384,4,32]{3,2,1,0} parameter(0)
  %k = bf16[2,384,4,32]{3,2,1,0} parameter(1)
  %fwd = (bf16[2,384,4,32]{3,2,1,0}, f32[2,4,384]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config":{"intermediate_tensor_shape":{"dimensions":["2","4","384","384"]},"mask_type":"CAUSAL"}}
  %bwd = (bf16[2,384,4,32]{3,2,1,0}, bf16[2,384,4,32]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %k, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={"cudnn_fmha_backend_config":{"intermediate_tensor_shape":{"dimensions":["2","4","384","384"]},"mask_type":"CAUSAL"}}
  %a = f8e4m3fn[64,32]{1,0} parameter(2)
  %b = f8e4m3fn[32,16]{1,0} parameter(3)
  %s = f32[] parameter(4)
  %te = (bf16[64,16]{1,0}, u8[1024]{0}) custom-call(%a, %s, %b, %s), custom_call_target="te_gemm_v2_ffi"
  %quantize = (f8e4m3fn[64,32]{1,0}, f32[1]{0}) custom-call(%q, %s), custom_call_target="te_dbias_quantize_ffi"
  %kv = bf16[2,384,2,32]{3,2,1,0} parameter(5)
  %dkdv = (f32[2,384,4,32]{3,2,1,0}, f32[2,384,4,32]{3,2,1,0}) custom-call(%q, %kv, %kv, %q), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(train_step)/flash_attention_dkdv/pallas_call"}, backend_config={name = "x"}
  ROOT %out = bf16[64,16]{1,0} get-tuple-element(%te), index=0
}
"""
    kernels = {k.name: k for k in roofline.project(hlo, "h100").kernels}
    pair = 2 * 2 * 4 * 384 * 384 * 32 * 0.5  # one causal [B, H, T, T] x D GEMM
    assert kernels["fwd"].category == "attention" and kernels["fwd"].flops == 2 * pair
    assert kernels["bwd"].flops == 5 * pair
    rate = H100.bf16_flops * roofline.ATTENTION_EFFICIENCY
    assert kernels["fwd"].seconds == pytest.approx(max(2 * pair / rate, kernels["fwd"].bytes / HBM))
    assert kernels["dkdv"].category == "attention" and kernels["dkdv"].flops == 4 * pair
    assert kernels["te"].category == "gemm_fp8" and kernels["te"].flops == 2 * 64 * 16 * 32
    assert kernels["quantize"].category == "quantization"


def _h100_mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    from jax.sharding import Mesh

    from infir2_jax.gpu_target import gpu_devices

    devices = gpu_devices("h100", int(np.prod(shape)))
    return Mesh(np.array(devices).reshape(shape), names)


@needs_plugin
def test_a_nested_scan_compiled_for_h100_counts_its_trips():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def layers(x, w):
        def outer(c, _):
            inner = lambda c, _: (jnp.tanh(c @ w), None)
            return jax.lax.scan(inner, c, None, length=4)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0]

    replicated = NamedSharding(_h100_mesh((1,), ("d",)), P())
    x = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16, sharding=replicated)
    w = jax.ShapeDtypeStruct((128, 128), jnp.bfloat16, sharding=replicated)
    text = jax.jit(layers).lower(x, w).compile().as_text()
    projection = roofline.project(text, "h100")
    assert sorted(loop["trips"] * loop["times"] for loop in projection.loops) == [3, 12]
    # 12 matmuls of [64, 128] x [128, 128], however XLA splits or fuses them
    assert projection.flops("gemm_bf16") == 12 * 2 * 64 * 128 * 128
    assert projection.breakdown["gemm_bf16"] > 0


@needs_plugin
def test_collectives_of_a_sharded_program_compiled_for_eight_h100s():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _h100_mesh((2, 4), ("a", "b"))

    def reduce_then_gather(x):  # a [128, 128] f32 block per device
        return jax.lax.all_gather(jax.lax.psum(x, "b"), "a", tiled=True)

    program = jax.shard_map(
        reduce_then_gather, mesh=mesh, in_specs=P("a", "b"), out_specs=P(), check_vma=False
    )
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P("a", "b")))
    projection = roofline.project(jax.jit(program).lower(x).compile().as_text(), "h100")
    collectives = {k.detail.split()[0]: k for k in projection.kernels if k.category == "collective"}
    block = 4 * 128 * 128
    assert set(collectives) == {"all-reduce", "all-gather"}
    assert "over 4 devices" in collectives["all-reduce"].detail
    assert collectives["all-reduce"].seconds == pytest.approx(2 * 3 / 4 * block / NVLINK)
    assert "over 2 devices" in collectives["all-gather"].detail
    assert collectives["all-gather"].seconds == pytest.approx(1 / 2 * 2 * block / NVLINK)


@needs_plugin
@pytest.mark.skipif(not deviceless_cudnn_attention(), reason="no deviceless cuDNN attention")
def test_projected_flops_of_a_tiny_train_step_match_the_model():
    """BF16, no recomputation, cuDNN attention: the projection's GEMM FLOPs are 6 x matmul
    weights x tokens (within 2 %: the vocabulary is padded 257 -> 264 for the LM head), its
    attention FLOPs 7/6 of the model's (cuDNN's backward recomputes QK^T: 2 + 5 GEMMs where
    the 6 x N x D x T convention counts 2 + 4)."""
    sets = ["train.seq_len=384", "execution.remat=none", "execution.attention_impl=auto"]
    plan = plan_h100(*sets, "fp8.recipe=none")
    model = load_config("tiny_cpt", ["model.intermediate_size=352", *sets]).model
    tokens = 2 * 384
    embedding = model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)
    matmul_weights = model.num_params - embedding + model.vocab_size * model.hidden_size
    attention = 6 * model.num_layers * model.num_heads * model.head_dim * 384 * tokens
    assert 6 * matmul_weights * tokens + attention == pytest.approx(plan["flops_per_step"])
    projection = plan["projection"]
    assert projection["gemm_flops"] == pytest.approx(6 * matmul_weights * tokens, rel=0.02)
    assert projection["attention_flops"] == pytest.approx(7 / 6 * attention, rel=1e-6)
    assert projection["breakdown_ms"]["gemm_fp8"] == 0 and projection["breakdown_ms"]["attention"]
    assert sum(projection["breakdown_ms"].values()) == pytest.approx(projection["total_ms"])
    seconds = projection["total_ms"] / 1e3
    assert projection["mfu"] == pytest.approx(plan["flops_per_step"] / seconds / H100.bf16_flops)
    assert projection["loops"] and all(loop["trips"] == 4 for loop in projection["loops"])
    text = "\n".join(roofline.describe(projection))
    assert f"projected step time on h100: {projection['total_ms']:.1f} ms" in text
    assert "not a measurement" in text and "MFU" in text and "BF16 GEMMs" in text
