"""The FP8 recipe registry: `fp8.recipe` -> a GEMM policy injected into the projections.

A policy is what a `Linear` calls instead of a plain matmul. Stateless policies are pure
functions of (x, w); the `delayed` policy also owns per-GEMM state (an amax history and a
probe, see `Fp8History` / `Fp8Probe`) that the Linear creates through `init_state`. Layers
never branch on the recipe: they call `policy(x, w, state)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from infir2_jax.fp8.base import Fp8History, Fp8Probe, Gemm
from infir2_jax.fp8.dots import (
    Fp8Spec,
    blockwise_dots,
    blockwise_mlp,
    current_scaling_dots,
    delayed_scaling_dot,
    rowwise_dots,
)
from infir2_jax.fp8.quantize import E4M3, E5M2
from infir2_jax.parallel.partitioned import partitioned_gemm, partitioned_mlp


def _bound(gemm: Gemm, target, layout) -> Gemm:
    """`gemm` (a policy with an `Fp8Spec`) bound to its platform and layout. Per-tensor GEMMs
    take the pinned form where XLA does not partition them across devices (fp8/dots.py)."""
    sharded = layout is not None and layout.mesh.size > 1
    spec = dataclasses.replace(gemm.spec, platform=target.platform, pinned=not sharded)
    return dataclasses.replace(gemm, layout=layout, spec=spec)


@dataclasses.dataclass(frozen=True)
class _StatelessFp8(Gemm):
    """Scales from the current tensors only: projections sharing an input quantize it once
    (`dots` takes the tuple of weights)."""

    spec: Fp8Spec = Fp8Spec(E4M3, E5M2)
    dots: Callable = current_scaling_dots

    @property
    def is_fp8(self) -> bool:
        return True

    def for_execution(self, target, layout):
        return _bound(self, target, layout)

    def fp8_dots(self, x, ws, states, uses, axes):
        return self.dots(x, ws, self.spec)


@dataclasses.dataclass(frozen=True)
class BlockwiseGemm(_StatelessFp8):
    """InfiR2's recipe. Its GEMMs may run as a Pallas kernel, which XLA's SPMD partitioner
    cannot split: under a sharded layout the whole FP8 GEMM (forward and backward) runs per
    device in a shard_map (`partitioned_gemm`), as Megatron's column/row-parallel layers do."""

    def _partitions(self, axes) -> bool:
        """Whether the GEMMs run per device in a shard_map: a kernel may run (not `emulated`)
        on a sharded layout and every weight has logical axes."""
        return self.spec.kernel != "emulated" and self.layout is not None and None not in axes

    def fp8_dots(self, x, ws, states, uses, axes):
        if not self._partitions(axes):
            return self.dots(x, ws, self.spec)
        return partitioned_gemm(
            lambda a, bs, gathered: self.dots(a, bs, self.spec, gathered), x, ws, axes, self.layout
        )

    @property
    def fuses_mlp(self) -> bool:
        return True

    def fused_mlp(self, x, ws, axes):
        if not self._partitions(axes):
            return blockwise_mlp(x, ws, self.spec)
        return partitioned_mlp(
            lambda a, bs, gathered: blockwise_mlp(a, bs, self.spec, gathered), x, ws, axes,
            self.layout,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DelayedGemm(Gemm):
    spec: Fp8Spec = Fp8Spec(E4M3, E5M2)
    history: int = 1024
    max_uses: int = 2

    @property
    def stateful(self) -> bool:
        return True

    @property
    def is_fp8(self) -> bool:
        return True

    def for_execution(self, target, layout):
        return _bound(self, target, layout)

    def init_state(self) -> dict[str, nnx.Variable]:
        return {
            "fp8_history": Fp8History(jnp.zeros((3, self.history), jnp.float32)),
            "fp8_probe": Fp8Probe(jnp.zeros((self.max_uses, 3), jnp.float32)),
        }

    def fp8_dots(self, x, ws, states, uses, axes):
        # Each GEMM scales x from its own amax history, so a shared x is quantized per GEMM.
        return tuple(self._dot(x, w, s, u) for w, s, u in zip(ws, states, uses, strict=True))

    def _dot(self, x, w, state, use):
        if use >= self.max_uses:
            raise ValueError(
                f"a delayed-scaling layer was applied {use + 1} times in one step; "
                f"raise fp8.max_uses (now {self.max_uses})"
            )
        return delayed_scaling_dot(x, w, state["fp8_history"], state["fp8_probe"][use], self.spec)

    def update_state(self, state, observed):
        return {"fp8_history": roll_history(state["fp8_history"], observed)}


def roll_history(history: jax.Array, probe_grad: jax.Array) -> jax.Array:
    """history [..., 3, H] <- this step's amaxes: the max over the probe rows [..., uses, 3]
    (uses of the layer, micro-batches already max-combined) enters at column 0."""
    observed = jnp.max(probe_grad, axis=-2)  # [..., 3]
    rolled = jnp.roll(history, 1, axis=-1)
    return rolled.at[..., 0].set(observed)


def _formats(fmt: str | None, default: str) -> tuple:
    choice = fmt or default
    return (E4M3, E5M2) if choice == "hybrid" else (E4M3, E4M3)


def _te(name: str) -> Callable[..., Gemm]:
    """TransformerEngine's recipe `name` (infir2_jax/fp8/te.py), TE imported on first use."""

    def build(cfg) -> Gemm:
        from infir2_jax.fp8.te import TeGemm, TransformerEngineError, import_te

        try:
            import_te()
        except TransformerEngineError as err:
            raise ValueError(f"fp8.recipe={name}: {err}") from err
        delayed = name == "te_delayed"
        if delayed and cfg.amax_history < 2:
            raise ValueError(
                f"fp8.amax_history: te_delayed needs at least 2 entries (TE resets one slot "
                f"per step), got {cfg.amax_history}"
            )
        fwd, bwd = _formats(cfg.format, "hybrid")
        return TeGemm(
            name,
            tuple(cfg.bf16_layers),
            delayed=delayed,
            fwd=fwd.name,
            bwd=bwd.name,
            margin=float(cfg.margin),
            history=cfg.amax_history,
            max_uses=cfg.max_uses,
        )

    return build


def _spec(cfg, default_formats: str, power_of_two: bool = False) -> Fp8Spec:
    fwd, bwd = _formats(cfg.format, default_formats)
    return Fp8Spec(
        fwd,
        bwd,
        margin=cfg.margin,
        power_of_two=power_of_two,
        block=cfg.block_size,
        kernel=cfg.blockwise_kernel,
    )


RECIPES: dict[str, Callable[..., Gemm]] = {
    "none": lambda cfg: Gemm(),
    "current": lambda cfg: _StatelessFp8(
        "current", tuple(cfg.bf16_layers), _spec(cfg, "hybrid"), current_scaling_dots
    ),
    "rowwise": lambda cfg: _StatelessFp8(
        "rowwise", tuple(cfg.bf16_layers), _spec(cfg, "hybrid"), rowwise_dots
    ),
    "blockwise": lambda cfg: BlockwiseGemm(
        "blockwise",
        tuple(cfg.bf16_layers),
        _spec(cfg, "e4m3", power_of_two=cfg.power_of_two_scales),
        blockwise_dots,
    ),
    "delayed": lambda cfg: DelayedGemm(
        "delayed",
        tuple(cfg.bf16_layers),
        _spec(cfg, "hybrid"),
        history=cfg.amax_history,
        max_uses=cfg.max_uses,
    ),
    "te_delayed": _te("te_delayed"),
    "te_current": _te("te_current"),
}


def make_gemm(cfg) -> Gemm:
    """The GEMM policy for an `FP8Config` (fp8.* keys)."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"fp8.recipe: {cfg.recipe!r} is not one of {sorted(RECIPES)}")
    return RECIPES[cfg.recipe](cfg)
