"""Blockwise-scaled FP8 GEMM for Hopper (DeepSeek-V3 / DeepGEMM scheme) in Pallas Mosaic GPU.

    out[M, N] = sum_kb (A_q[:, kb] @ B_q[kb, :]) * a_scale[:, kb, None] * b_scale(kb)[None, :]

over the 128-wide K blocks `kb`, with FP32 accumulation. The same arithmetic as the
`blockwise` recipe's emulation in `infir2_jax.fp8.dots` (which dequantizes and runs an FP32
dot), as a real kernel.

Operands and layouts
--------------------
* `a_q` float8_e4m3fn [M, K], row-major (K contiguous). `a_scale` float32 [M, ceil(K/128)]:
  one scale per row per 128-K block (activations and gradients in 1x128 tiles; for wgrad,
  xᵀ with one scale per row per 128 tokens).
* `b_q_kmajor` float8_e4m3fn [N, K], row-major: B given K-major, i.e. the transpose of the
  [K, N] right operand. Hopper's 8-bit wgmma only reads K-major operands from SMEM, so the
  kernel needs both operands with K contiguous; a caller holding B as [K, N] transposes it.
* `b_scale`, by `b_scale_mode`:
  - "block": float32 [ceil(N/128), ceil(K/128)], one scale per 128x128 block of B (weights:
    fprop and dgrad);
  - "column": float32 [N, ceil(K/128)], one scale per output column per 128-K block (wgrad,
    where K is tokens and B = g quantized in 128x1 tiles).
* Scales are dequantization multipliers (x ≈ q * s), as in `infir2_jax.fp8.quantize`.
* Both operands must be float8_e4m3fn (Mosaic GPU's wgmma takes one element type for both,
  so an E5M2 gradient times an E4M3 weight is not supported). The scale block is 128.

Kernel
------
A persistent, warp-specialized kernel after jax's `hopper_matmul_mgpu.py` (our own code):
one CTA per SM walks the output tiles (banded, snaking order for L2 reuse); per tile, a
memory warpgroup streams 128-wide K steps through `max_concurrent_steps` SMEM stages with
TMA (A and B tiles 128-byte swizzled; the step's a-scales [cta_tile_m] and b-scales —
[cta_tile_n] in column mode, the 4-block group holding this tile's block in block mode —
ride in the same pipeline stage), and two compute warpgroups each own a tile_m x tile_n
half of the CTA tile.

Promotion. Per K step a compute warpgroup issues the wgmma into a fresh zeroed FP32
accumulator, waits for it, and folds it into its own FP32 register accumulator:
    acc += partial * a_s[:, None] * b_s          (b_s a scalar in block mode)
    acc += partial * a_s[:, None] * b_s[None, :] (column mode)
The wgmma sees only 128 of K before its sum is rescaled and added in full FP32 — the fix
DeepGEMM uses because Hopper's FP8 tensor cores accumulate with reduced precision (about 14
bits) — and per-block scales that vary along K are applied exactly where they belong.
The epilogue casts to `out_dtype` (bfloat16 or float32) and stores through SMEM with TMA.

Partial tiles: TMA loads fill out-of-bounds elements with zeros and TMA stores drop them,
so M and N need not be multiples of the CTA tile: edge tiles run in full and their extra
rows/columns are never written. The wrapper pads (with zeros, then slices the result) only
where Mosaic GPU's TMA of a swizzled tile requires it — each GMEM dimension a multiple of
its SMEM tile (8 rows; 128 FP8 along K; the output's swizzle width) and every row 16-byte
aligned: M to a multiple of 8 (copies A), K to a multiple of 128 (copies A and B; zero
columns add nothing whatever their scale), B's rows to a multiple of 8, and the output's
N, when no 32/64/128-byte swizzle width divides it, to a multiple of 16 bf16 / 8 f32
columns. None of this happens for the Qwen2.5 projections (M, N multiples of 64, K of 128).
The small scale arrays are always transposed to [K-blocks, M] / [K-blocks, N] (and padded
to whole tiles) so that one K step's scales are one contiguous TMA row.

What is verified, and where
---------------------------
On CPU (tests/test_kernel_blockwise_fp8.py): (1) GPU interpret mode runs this kernel
(threads, barriers, TMA copies, wgmma) against the reference for edge tiles, both scale
modes, both output dtypes, both warpgroup splits; jax 0.10.2's interpreter needs two test-
side patches (tests/kernel_support.py: transposed wgmma operands, clipped TMA stores) and
computes wgmma in FP32 with no-op waits, so it checks arithmetic and indexing only;
(2) lowering for CUDA (Mosaic GPU, Hopper rules such as K-major 8-bit wgmma operands and
layout inference) at every Qwen2.5-1.5B/7B projection GEMM shape.
NOT verified here (no GPU): speed, the tile/stage defaults, register allocation (spills),
SMEM fit beyond our own budget check, synchronisation, and the accumulation precision of
real FP8 tensor cores. Run the kernel on an H100/H200 before relying on it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SCALE_BLOCK = 128  # K (and, for B in block mode, N) extent of one scale
TILE_K = SCALE_BLOCK  # one pipeline K step = one scale block
FP8 = jnp.dtype(jnp.float8_e4m3fn)
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
H100_SMS = 132  # H100 SXM / H200; only sizes the persistent grid
SMEM_BYTES = 227 * 1024  # Hopper's per-block dynamic shared memory limit
_TMA_MAX_BOX = 256  # TMA box extent limit per dimension
_BLOCK_GROUP = 4  # block-mode b-scales travel in rows of 4 (TMA's 16-byte minimum)

BScaleMode = Literal["block", "column"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Tile shapes and scheduling. Defaults aim at H100/H200 (untuned: no GPU here).

    tile_m, tile_n: one compute warpgroup's output tile (tile_m a multiple of 64, wgmma's M;
      tile_n a multiple of 16, at most 256, and in block mode a divisor of 128 so that a
      warpgroup's columns share one weight block). Two warpgroups split the CTA tile along
      `wg_dimension`, so the CTA tile is (2*tile_m, tile_n) for "m", (tile_m, 2*tile_n) for
      "n". Each warpgroup holds two FP32 tiles in registers (the promoted accumulator and the
      wgmma partial): tile_m*tile_n <= 64*192 keeps that under the ~232 registers a thread
      gets; 64x128 (default) leaves room.
    max_concurrent_steps: pipeline depth (SMEM stages of A, B and scales).
    band_dim, band_width: output tiles are visited in bands `band_width` tiles wide along
      `band_dim`, consecutive bands snaking, so CTAs working at the same time share A rows
      and B columns in L2.
    num_sms: persistent grid size (default: the local GPU's SM count, else 132).
    memory_registers: registers per thread kept by the TMA warpgroup.
    """

    tile_m: int = 64
    tile_n: int = 128
    wg_dimension: Literal["m", "n"] = "m"
    max_concurrent_steps: int = 4
    band_dim: Literal["m", "n"] = "m"
    band_width: int = 8
    num_sms: int | None = None
    memory_registers: int = 40

    @property
    def cta_tile_m(self) -> int:
        return self.tile_m * (2 if self.wg_dimension == "m" else 1)

    @property
    def cta_tile_n(self) -> int:
        return self.tile_n * (2 if self.wg_dimension == "n" else 1)

    def smem_bytes(self, b_scale_mode: BScaleMode, out_dtype) -> int:
        """SMEM the kernel allocates (pipeline stages plus both epilogue tiles)."""
        bs_width = self.cta_tile_n if b_scale_mode == "column" else _BLOCK_GROUP
        stage = (self.cta_tile_m + self.cta_tile_n) * TILE_K * FP8.itemsize
        stage += (self.cta_tile_m + bs_width) * 4
        out = 2 * self.tile_m * self.tile_n * jnp.dtype(out_dtype).itemsize
        return self.max_concurrent_steps * stage + out

    def validate(self, b_scale_mode: BScaleMode, out_dtype) -> None:
        problems = []
        if self.wg_dimension not in ("m", "n") or self.band_dim not in ("m", "n"):
            problems.append("wg_dimension and band_dim must be 'm' or 'n'")
        if self.tile_m <= 0 or self.tile_m % 64:
            problems.append(f"tile_m={self.tile_m} must be a positive multiple of 64")
        if not 0 < self.tile_n <= 256 or self.tile_n % 16:
            problems.append(f"tile_n={self.tile_n} must be a multiple of 16 in [16, 256]")
        if self.cta_tile_m > _TMA_MAX_BOX or self.cta_tile_n > _TMA_MAX_BOX:
            problems.append(
                f"CTA tile {self.cta_tile_m}x{self.cta_tile_n} exceeds TMA's {_TMA_MAX_BOX}"
            )
        if b_scale_mode == "block" and self.tile_n > 0 and SCALE_BLOCK % self.tile_n:
            problems.append(f"block mode needs tile_n dividing {SCALE_BLOCK}, got {self.tile_n}")
        if self.max_concurrent_steps < 1 or self.band_width < 1:
            problems.append("max_concurrent_steps and band_width must be >= 1")
        if not problems and self.smem_bytes(b_scale_mode, out_dtype) > SMEM_BYTES:
            problems.append(
                f"needs {self.smem_bytes(b_scale_mode, out_dtype)} bytes of SMEM "
                f"(limit {SMEM_BYTES}); lower max_concurrent_steps or the tiles"
            )
        if problems:
            raise ValueError("invalid TuningConfig: " + "; ".join(problems))


def tile_coordinates(
    lin: jax.Array, m_iters: int, n_iters: int, band_dim: str, band_width: int
) -> tuple[jax.Array, jax.Array]:
    """(m, n) tile of the linear tile index `lin`, in bands `band_width` tiles wide along
    `band_dim` (that index fastest inside a band), successive bands walking the other
    dimension in alternating directions. No division by a value that can be zero (XLA's
    CPU constant folder traps on one, and jax's planar_snake computes one when the band
    width divides the grid)."""
    size, other = (m_iters, n_iters) if band_dim == "m" else (n_iters, m_iters)
    width = min(band_width, size)
    per_band = jnp.int32(width * other)
    band = lax.div(lin, per_band)
    start = band * width
    this_width = jnp.minimum(jnp.int32(size) - start, jnp.int32(width))  # >= 1
    within = lin - band * per_band
    i = start + lax.rem(within, this_width)
    j = lax.div(within, this_width)
    j = jnp.where(lax.rem(band, jnp.int32(2)) == 0, j, other - 1 - j)
    return (i, j) if band_dim == "m" else (j, i)


def _kernel(
    a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *, cfg: TuningConfig, mode, k_iters, out_swizzle
):
    """a [M, K] f8, b [N, K] f8 (K-major), as [kb, M'] f32, bs [kb, N' | 4*ceil(NB/4)] f32,
    out [M, N'] (shapes as padded by the wrapper)."""
    m = a_gmem.shape[0]
    n = out_gmem.shape[1]
    out_dtype = out_gmem.dtype
    tile_m, tile_n = cfg.tile_m, cfg.tile_n
    cta_m, cta_n = cfg.cta_tile_m, cfg.cta_tile_n
    m_iters, n_iters = _cdiv(m, cta_m), _cdiv(n, cta_n)
    bs_width = cta_n if mode == "column" else _BLOCK_GROUP

    # 128-byte swizzle: one 128-element FP8 K step per row, tiled (8, 128) for wgmma.
    fp8_transforms = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    out_bytes = jnp.dtype(out_dtype).itemsize
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle // out_bytes)),
        plgpu.SwizzleTransform(out_swizzle),
    )

    def make_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=cfg.memory_registers,
            in_specs=[
                plgpu.BlockSpec((cta_m, TILE_K), lambda k: (0, k), transforms=fp8_transforms),
                plgpu.BlockSpec((cta_n, TILE_K), lambda k: (0, k), transforms=fp8_transforms),
                plgpu.BlockSpec((1, cta_m), lambda k: (k, 0)),
                plgpu.BlockSpec((1, bs_width), lambda k: (k, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=compute_context,
        )

    def no_op(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        # The allocations depend only on block shapes, not on which tile is streamed.
        pipeline_allocs=make_pipeline(no_op, no_op).get_allocations(
            a_gmem.at[:cta_m], b_gmem.at[:cta_n], as_gmem.at[:, :cta_m], bs_gmem.at[:, :bs_width]
        ),
        out_smem=plgpu.SMEM((2, tile_m, tile_n), out_dtype, transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg_idx = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(loop_info):
            (lin,) = loop_info.index
            m_idx, n_idx = tile_coordinates(lin, m_iters, n_iters, cfg.band_dim, cfg.band_width)
            cta_m_slice = pl.ds(m_idx * cta_m, cta_m)
            cta_n_slice = pl.ds(n_idx * cta_n, cta_n)
            if cfg.wg_dimension == "m":
                wg_m_slice = pl.ds(wg_idx * tile_m, tile_m)
                wg_n_slice = slice(None)
                wg_n0 = n_idx * cta_n
            else:
                wg_m_slice = slice(None)
                wg_n_slice = pl.ds(wg_idx * tile_n, tile_n)
                wg_n0 = n_idx * cta_n + wg_idx * tile_n
            if mode == "column":
                bs_slice = cta_n_slice
            else:
                # The group of 4 weight blocks holding this CTA's columns (a CTA tile of at
                # most 256 aligned columns never straddles two groups of 512), and the lane
                # of this warpgroup's block in it (tile_n divides 128: one block).
                group = lax.div(n_idx * cta_n, jnp.int32(SCALE_BLOCK * _BLOCK_GROUP))
                bs_slice = pl.ds(group * _BLOCK_GROUP, _BLOCK_GROUP)
                bs_lane = lax.rem(lax.div(wg_n0, jnp.int32(SCALE_BLOCK)), _BLOCK_GROUP)

            def mma_body(_, a_smem, b_smem, as_smem, bs_smem, acc):
                # Scales first: their SMEM loads overlap the wgmma.
                a_s = as_smem[0, wg_m_slice]
                if mode == "column":
                    a_bc = lax.broadcast_in_dim(a_s, (tile_m, tile_n), (0,))
                    b_bc = lax.broadcast_in_dim(bs_smem[0, wg_n_slice], (tile_m, tile_n), (1,))
                else:
                    row_scale = a_s * bs_smem[0, bs_lane]
                    a_bc = lax.broadcast_in_dim(row_scale, (tile_m, tile_n), (0,))

                def k_step(acc_ref):  # a fresh zeroed FP32 wgmma accumulator per K step
                    plgpu.wgmma(
                        acc_ref,
                        a_smem.at[wg_m_slice],
                        b_smem.at[wg_n_slice].transpose((1, 0)),  # K-major B
                    )
                    return acc_ref[...]  # waits for the wgmma

                partial = pl.run_scoped(k_step, plgpu.ACC((tile_m, tile_n), jnp.float32))
                # Promotion into the FP32 accumulator.
                if mode == "column":
                    return acc + partial * a_bc * b_bc
                return acc + partial * a_bc

            def compute_context(run_pipeline):
                acc = run_pipeline(jnp.zeros((tile_m, tile_n), jnp.float32))
                # The previous tile's store must have read out_smem before we overwrite it.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[wg_idx] = acc.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(  # TMA drops the rows/columns beyond M, N
                    out_smem.at[wg_idx],
                    out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m_slice, wg_n_slice],
                )

            make_pipeline(mma_body, compute_context)(
                a_gmem.at[cta_m_slice],
                b_gmem.at[cta_n_slice],
                as_gmem.at[:, cta_m_slice],
                bs_gmem.at[:, bs_slice],
                allocations=pipeline_allocs,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _output_layout(n: int, tile_n: int, out_dtype) -> tuple[int, int]:
    """(swizzle bytes of the output tile, padded output width): the widest swizzle (Mosaic GPU
    takes 32, 64 or 128 bytes) whose width divides the warpgroup tile and N, N padded to a
    multiple of the 32-byte swizzle's width only if no swizzle divides it."""
    itemsize = jnp.dtype(out_dtype).itemsize
    for swizzle in (128, 64, 32):
        elems = swizzle // itemsize
        if tile_n % elems == 0 and n % elems == 0:
            return swizzle, n
    return 32, _round_up(n, 32 // itemsize)  # tile_n is a multiple of 16: 32 bytes of bf16


def _num_sms() -> int:
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return H100_SMS
    return getattr(devices[0], "core_count", None) or H100_SMS


def _check_operands(a_q, a_scale, b_q_kmajor, b_scale, b_scale_mode, out_dtype):
    if b_scale_mode not in ("block", "column"):
        raise ValueError(f"b_scale_mode must be 'block' or 'column', got {b_scale_mode!r}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    if a_q.ndim != 2 or b_q_kmajor.ndim != 2:
        raise ValueError(f"a_q and b_q_kmajor must be 2-D, got {a_q.shape}, {b_q_kmajor.shape}")
    if a_q.dtype != FP8 or b_q_kmajor.dtype != FP8:
        raise ValueError(
            f"a_q and b_q_kmajor must be float8_e4m3fn, got {a_q.dtype}, {b_q_kmajor.dtype}"
        )
    (m, k), (n, k2) = a_q.shape, b_q_kmajor.shape
    if k != k2:
        raise ValueError(
            f"contraction mismatch: a_q {a_q.shape} is [M, K], b_q_kmajor {b_q_kmajor.shape} "
            "must be [N, K] (B transposed, K contiguous)"
        )
    kb = _cdiv(k, SCALE_BLOCK)
    want_b = (_cdiv(n, SCALE_BLOCK), kb) if b_scale_mode == "block" else (n, kb)
    for name, scale, want in (("a_scale", a_scale, (m, kb)), ("b_scale", b_scale, want_b)):
        if tuple(scale.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(scale.shape)}")
        if scale.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32, got {scale.dtype}")
    return m, n, k, kb


@functools.partial(jax.jit, static_argnames=("b_scale_mode", "out_dtype", "interpret", "config"))
def blockwise_fp8_matmul(
    a_q: jax.Array,
    a_scale: jax.Array,
    b_q_kmajor: jax.Array,
    b_scale: jax.Array,
    *,
    b_scale_mode: BScaleMode,
    out_dtype=jnp.bfloat16,
    interpret=False,
    config: TuningConfig | None = None,
) -> jax.Array:
    """[M, N] = blockwise-scaled A_q [M, K] @ B_q [K, N] (B passed K-major as [N, K]).

    a_scale [M, ceil(K/128)]; b_scale [ceil(N/128), ceil(K/128)] ("block") or
    [N, ceil(K/128)] ("column"); all float32 dequantization scales. FP32 accumulation with
    per-128-K promotion, result cast to `out_dtype` (bfloat16 or float32).

    `interpret`: False runs the Hopper kernel; an `InterpretGPUParams` (or True, for the
    TMA-like zero fill of out-of-bounds loads) runs jax's GPU interpreter on the CPU, which
    in jax 0.10.2 also needs the patches in tests/kernel_support.py.
    """
    out_dtype = jnp.dtype(out_dtype)
    m, n, k, kb = _check_operands(a_q, a_scale, b_q_kmajor, b_scale, b_scale_mode, out_dtype)
    cfg = config or TuningConfig()
    cfg.validate(b_scale_mode, out_dtype)
    if m == 0 or n == 0 or k == 0:
        return jnp.zeros((m, n), out_dtype)

    # Mosaic GPU moves a swizzled tile with TMA over the tiled view of the GMEM array, so each
    # dimension must be a multiple of its tile (8 rows; 128 FP8 of K; the output tile's
    # swizzle width) or smaller than it. Zero padding where a shape is not: never for the
    # Qwen2.5 projections (M, N multiples of 64, K of 128). Zero K columns add nothing.
    m_pad, k_pad, n_pad = _round_up(m, 8), _round_up(k, TILE_K), _round_up(n, 8)
    if (m_pad, k_pad) != (m, k):
        a_q = jnp.pad(a_q, ((0, m_pad - m), (0, k_pad - k)))
    if (n_pad, k_pad) != (n, k):
        b_q_kmajor = jnp.pad(b_q_kmajor, ((0, n_pad - n), (0, k_pad - k)))
    out_swizzle, n_out = _output_layout(n, cfg.tile_n, out_dtype)
    # Scales K-block-major, so one K step's scales are a contiguous TMA row; padded to whole
    # tiles (values there only meet rows/columns that are dropped).
    a_scale_t = jnp.pad(a_scale.T, ((0, 0), (0, _round_up(m_pad, cfg.cta_tile_m) - m)))
    if b_scale_mode == "column":
        b_scale_t = jnp.pad(b_scale.T, ((0, 0), (0, _round_up(n_out, cfg.cta_tile_n) - n)))
    else:
        nb = b_scale.shape[0]
        b_scale_t = jnp.pad(b_scale.T, ((0, 0), (0, _round_up(nb, _BLOCK_GROUP) - nb)))

    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams(
            out_of_bounds_reads="uninitialized", uninitialized_memory="zero"
        )
    tiles = _cdiv(m_pad, cfg.cta_tile_m) * _cdiv(n_out, cfg.cta_tile_n)
    call = plgpu.kernel(
        functools.partial(_kernel, cfg=cfg, mode=b_scale_mode, k_iters=kb, out_swizzle=out_swizzle),
        out_type=jax.ShapeDtypeStruct((m_pad, n_out), out_dtype),
        grid=(min(cfg.num_sms or _num_sms(), tiles),),
        grid_names=("sm",),
        num_threads=3,  # two compute warpgroups and the TMA warpgroup
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret} if interpret else {}),
    )
    out = call(a_q, b_q_kmajor, a_scale_t, b_scale_t)
    out = out[:m, :n] if (m_pad, n_out) != (m, n) else out
    return _varying_like(out, a_q, a_scale, b_q_kmajor, b_scale)


def _varying_like(out: jax.Array, *operands: jax.Array) -> jax.Array:
    """Inside a shard_map, the result varies over the mesh axes its operands vary over; a
    Pallas call does not say so itself (its result would type as device-invariant)."""
    varying = frozenset().union(*(jax.typeof(o).manual_axis_type.varying for o in operands))
    missing = varying - jax.typeof(out).manual_axis_type.varying
    return jax.lax.pcast(out, tuple(sorted(missing)), to="varying") if missing else out


def expand_b_scale(b_scale: jax.Array, b_scale_mode: BScaleMode, n: int) -> jax.Array:
    """b_scale as one scale per column per K block, [N, ceil(K/128)]."""
    if b_scale_mode == "column":
        return b_scale
    return jnp.repeat(b_scale, SCALE_BLOCK, axis=0)[:n]


@functools.partial(jax.jit, static_argnames=("b_scale_mode", "out_dtype"))
def blockwise_fp8_matmul_reference(
    a_q: jax.Array,
    a_scale: jax.Array,
    b_q_kmajor: jax.Array,
    b_scale: jax.Array,
    *,
    b_scale_mode: BScaleMode,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """What `blockwise_fp8_matmul` computes, in plain jnp: both operands dequantized per
    block in FP32 (x = q * s, as `infir2_jax.fp8.quantize.dequantize_blocks`), one FP32
    HIGHEST-precision dot per 128-wide K block, the blocks summed in K order in FP32, then
    cast to `out_dtype`."""
    out_dtype = jnp.dtype(out_dtype)
    m, n, k, kb = _check_operands(a_q, a_scale, b_q_kmajor, b_scale, b_scale_mode, out_dtype)
    a = a_q.astype(jnp.float32) * jnp.repeat(a_scale, SCALE_BLOCK, axis=1)[:, :k]
    b_cols = expand_b_scale(b_scale, b_scale_mode, n)
    b = b_q_kmajor.astype(jnp.float32) * jnp.repeat(b_cols, SCALE_BLOCK, axis=1)[:, :k]
    pad = ((0, 0), (0, kb * SCALE_BLOCK - k))
    a_blocks = jnp.pad(a, pad).reshape(m, kb, SCALE_BLOCK).transpose(1, 0, 2)
    b_blocks = jnp.pad(b, pad).reshape(n, kb, SCALE_BLOCK).transpose(1, 0, 2)

    def block_product(a_blk, b_blk):
        return lax.dot_general(
            a_blk,
            b_blk,
            (((1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    def k_step(acc, blocks):
        return acc + block_product(*blocks), None

    # Started from the first block's product, not from zeros: inside a shard_map the carry
    # then varies over the same mesh axes as the operands (an exact 0 + p0 either way).
    first = block_product(a_blocks[0], b_blocks[0])
    acc, _ = lax.scan(k_step, first, (a_blocks[1:], b_blocks[1:]))
    return acc.astype(out_dtype)
