"""Hand-written accelerator kernels (Pallas). See each module's docstring for what is verified."""

from infir2_jax.kernels.blockwise_fp8 import (
    TuningConfig,
    blockwise_fp8_matmul,
    blockwise_fp8_matmul_reference,
)

__all__ = ["TuningConfig", "blockwise_fp8_matmul", "blockwise_fp8_matmul_reference"]
