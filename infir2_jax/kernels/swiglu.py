"""SwiGLU's arithmetic for the blockwise MLP block, defined once: its reference path
(infir2_jax/fp8/dots.py `blockwise_mlp`), its BF16 layers and the quantizer kernels that fuse
SwiGLU (infir2_jax/kernels/blockwise_quantize.py) all compute these functions. (The other
recipes' MLP, infir2_jax/model/mlp.py, writes SwiGLU in BF16 ops, which XLA fuses better
into their amax passes.)

In FP32 from the inputs' values, each result rounded to the inputs' dtype once: so a kernel
that evaluates them on a tile and XLA evaluating them on the whole tensor agree, which BF16
arithmetic op by op would not promise (XLA:GPU keeps excess precision between fused ops,
other paths round after each one). σ(g) is written out as 1 / (1 + exp(-g)), the division
passed in (`divide`): a kernel passes an IEEE division (Triton's own `/` approximates), as
XLA divides. XLA:GPU and Pallas' Triton lowering both call libdevice's `__nv_expf`; that
the kernel's h equals XLA's bit for bit on a GPU is not yet checked on one.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp


def _sigmoid(g: jax.Array, divide) -> jax.Array:
    return divide(jnp.ones_like(g), 1.0 + jnp.exp(-g))


def swiglu_value(gate: jax.Array, up: jax.Array, divide=operator.truediv) -> jax.Array:
    """silu(gate) · up, in FP32, rounded once to gate's dtype."""
    g = gate.astype(jnp.float32)
    return (g * _sigmoid(g, divide) * up.astype(jnp.float32)).astype(gate.dtype)


def swiglu_grads(gate: jax.Array, up: jax.Array, dh: jax.Array, divide=operator.truediv):
    """(d gate, d up) of silu(gate) · up for the cotangent dh, in FP32, each rounded once to
    its input's dtype: d up = dh · silu(g), d gate = dh · u · σ(g) · (1 + g · (1 − σ(g)))."""
    g, u, d = (a.astype(jnp.float32) for a in (gate, up, dh))
    s = _sigmoid(g, divide)
    return (d * u * (s * (1.0 + g * (1.0 - s)))).astype(gate.dtype), (d * (g * s)).astype(up.dtype)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`swiglu_value`. Its backward pass keeps only gate and up (not silu's [tokens, ffn]
    intermediates) and computes both gradients in one pass (`swiglu_grads`)."""
    return swiglu_value(gate, up)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
    return swiglu_grads(*residuals, dh)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
