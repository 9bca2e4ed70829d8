"""Basic layers: Linear (with an injected GEMM policy: BF16 or an FP8 recipe), Embedding, RMSNorm.

Every parameter carries logical axis names (`out_sharding` metadata); mapping them to mesh
axes is the job of a rules table outside the model, so model code never names a mesh axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from infir2_jax.fp8.base import BF16, Fp8Switch, Gemm
from infir2_jax.kernels.swiglu import swiglu
from infir2_jax.model.config import ModelConfig
from infir2_jax.parallel.rules import constrain

Axes = tuple[str, ...]
# Where the MLP's inner activations (gate, up, their SwiGLU) live: tokens as the layout splits
# them inside a block, the FFN width over tensor parallelism.
MLP_INNER: Axes = ("batch", "inner_seq", "act_mlp")


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A parameter annotated with logical axis names; sharding is applied later by rules."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def projection_options(
    cfg: ModelConfig, rngs: nnx.Rngs, gemm: Gemm, fp8_switch: jax.Array | None
) -> dict:
    """The Linear keyword arguments every projection of a decoder layer shares."""
    return dict(
        init_std=cfg.init_std,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
        gemm=gemm,
        fp8_switch=fp8_switch,
    )


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel is [in, out] (HF's `weight` transposed).

    The matmul is the injected `gemm` policy (BF16, or an FP8 recipe from `infir2_jax.fp8`);
    a stateful recipe (delayed scaling) keeps its per-GEMM state here as the non-parameter
    variables `gemm.init_state()` names. Each application within one traced step uses its own
    probe row (`_uses`). `fp8_switch` (a bool; only when some layer stays BF16) turns the
    recipe off for this layer: an `Fp8Switch` variable, stacked with the layer's parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool = False,
        init_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        gemm: Gemm = BF16,
        fp8_switch: jax.Array | None = None,
    ):
        init = jax.nn.initializers.normal(init_std)
        self.kernel = param(init(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None
        self.dtype = dtype
        self.gemm = gemm
        self.axes = axes
        state = gemm.init_state()
        for name, variable in state.items():  # the attribute names are the checkpoint keys
            setattr(self, name, variable)
        self.state_names = tuple(state)
        self.fp8_switch = None if fp8_switch is None else Fp8Switch(jnp.asarray(fp8_switch))
        self._uses = 0

    def __call__(self, x: jax.Array) -> jax.Array:
        return project(x, (self,))[0]

    def _gemm_inputs(self) -> tuple[jax.Array, dict[str, jax.Array], int]:
        """(kernel in the compute dtype, FP8 state, this application's probe row)."""
        state = {name: getattr(self, name)[...] for name in self.state_names}
        use = self._uses
        if self.gemm.stateful:
            self._uses += 1
        return self.kernel[...].astype(self.dtype), state, use


def project(x: jax.Array, linears: tuple[Linear, ...]) -> tuple[jax.Array, ...]:
    """One input through several Linear layers with one GEMM policy call (q, k, v; gate, up),
    so an FP8 recipe quantizes x once and keeps one FP8 copy of it for the backward pass.
    The layers share a layer's FP8 switch (None: FP8 wherever the recipe is, no branch)."""
    gemm, dtype = linears[0].gemm, linears[0].dtype
    if any(lin.gemm != gemm or lin.dtype != dtype for lin in linears):
        raise ValueError("project: the layers must share one GEMM policy and compute dtype")
    lead, width = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, width).astype(dtype)  # [tokens, in]
    kernels, states, uses = zip(*(lin._gemm_inputs() for lin in linears), strict=True)
    axes = tuple(lin.axes for lin in linears)
    switch = linears[0].fp8_switch
    enabled = None if switch is None else switch[...]
    ys = gemm.many(x2d, kernels, states, uses=uses, enabled=enabled, axes=axes)
    out = []
    for lin, y, kernel in zip(linears, ys, kernels, strict=True):
        y = y.reshape(*lead, kernel.shape[1])
        if lin.bias is not None:
            y = y + lin.bias[...].astype(dtype)
        out.append(y)
    return tuple(out)


def project_mlp(x: jax.Array, linears: tuple[Linear, Linear, Linear]) -> jax.Array:
    """down(swiglu(gate(x), up(x))) for (gate, up, down) as one call of a policy that fuses the
    MLP block (`Gemm.fuses_mlp`); BF16 where the layers' FP8 switch is off."""
    gemm, dtype = linears[0].gemm, linears[0].dtype
    if any(lin.gemm != gemm or lin.dtype != dtype or lin.bias is not None for lin in linears):
        raise ValueError("project_mlp: the layers must share one policy and dtype, no bias")
    if any(lin.state_names for lin in linears):
        raise ValueError(f"project_mlp: the {gemm.name} policy keeps per-GEMM state")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).astype(dtype)  # [tokens, hidden]
    w_gate, w_up, w_down = (lin._gemm_inputs()[0] for lin in linears)
    axes = tuple(lin.axes for lin in linears)

    def fp8():
        return gemm.fused_mlp(x2d, (w_gate, w_up, w_down), axes)

    def bf16():  # gate and up placed as the unfused MLP places them (model/mlp.py)
        gate, up = (
            constrain(jnp.dot(x2d, w).reshape(*lead, w.shape[1]), MLP_INNER) for w in (w_gate, w_up)
        )
        h = swiglu(gate, up)
        return jnp.dot(h.reshape(-1, h.shape[-1]), w_down)

    switch = linears[0].fp8_switch
    y = fp8() if switch is None else jax.lax.cond(switch[...], fp8, bf16)
    return y.reshape(*lead, w_down.shape[1])


class Embedding(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` is the tied lm_head (h @ tableᵀ)."""

    def __init__(
        self,
        vocab_size: int,
        features: int,
        *,
        init_std: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(init_std)
        table = init(rngs.params(), (vocab_size, features), param_dtype)
        self.embedding = param(table, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """HF Qwen2RMSNorm: statistics in FP32, the scale applied in the compute dtype."""

    def __init__(self, features: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.scale = param(jnp.ones((features,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """scale · x / rms(x), statistics in FP32. Recomputed in the backward pass (jax.checkpoint),
    which then keeps only x — the residual stream, saved anyway — instead of two FP32 copies
    of it per norm (8 × hidden bytes per token and norm)."""
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + eps)).astype(dtype)
    return scale.astype(dtype) * normed
