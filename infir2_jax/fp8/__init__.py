"""FP8 recipes: quantizers, scaled matmuls with custom VJPs, and the recipe registry."""

from infir2_jax.fp8.base import Fp8History, Fp8Probe, Fp8Scale, Fp8State, Fp8Switch, Gemm
from infir2_jax.fp8.dots import (
    Fp8Spec,
    blockwise_dot,
    blockwise_dots,
    current_scaling_dot,
    current_scaling_dots,
    delayed_scaling_dot,
    rowwise_dot,
    rowwise_dots,
)
from infir2_jax.fp8.quantize import (
    E4M3,
    E5M2,
    Fp8Format,
    dequantize_blocks,
    finite_amax,
    quantize_blocks,
    scale_from_amax,
)
from infir2_jax.fp8.recipes import RECIPES, DelayedGemm, make_gemm, roll_history

__all__ = [
    "E4M3",
    "E5M2",
    "RECIPES",
    "DelayedGemm",
    "Fp8Format",
    "Fp8History",
    "Fp8Probe",
    "Fp8Scale",
    "Fp8State",
    "Fp8Switch",
    "Fp8Spec",
    "Gemm",
    "blockwise_dot",
    "blockwise_dots",
    "current_scaling_dot",
    "current_scaling_dots",
    "delayed_scaling_dot",
    "dequantize_blocks",
    "finite_amax",
    "make_gemm",
    "quantize_blocks",
    "roll_history",
    "rowwise_dot",
    "rowwise_dots",
    "scale_from_amax",
]
