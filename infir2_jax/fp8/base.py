"""The FP8 base types: the GEMM policy interface (`Gemm`, also the BF16 policy) and the
variables a policy keeps beside each projection's kernel.

Recipes (fp8/recipes.py, fp8/te.py) build on these; layers import only this module, so the
model never depends on a particular recipe.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    from infir2_jax.parallel.rules import Layout
    from infir2_jax.target import Target


# The name per-tensor recipes give their scales in the step's jaxpr (`checkpoint_name`): the
# remat policies keep these scalars, so a recomputed forward pass does not take amaxes again.
FP8_SCALE = "fp8_scale"


class Fp8State(nnx.Variable):
    """State of a stateful FP8 recipe. Not a parameter: no optimizer, weight decay, clipping or
    averaging ever sees it; the recipe updates it once per optimizer step from the amaxes the
    probes report (`Gemm.update_state`). Saved in checkpoints, replicated on every device."""


class Fp8History(Fp8State):
    """An amax history [3, H] (rows x, w, g). `delayed`: column 0 newest; `te_delayed`: TE's
    layout (TE's DelayedScaleQuantizer rolls it)."""


class Fp8Scale(Fp8State):
    """`te_delayed`: TE's current scales [3] (x, w, g), computed from the history at the last
    update."""


class Fp8Probe(nnx.Variable):
    """Zeros [uses, 3]; the gradient w.r.t. row k is the amax of (x, w, g) observed by the
    k-th application of the layer in one step, so a layer applied twice is counted once
    (the update takes the max over rows, never a sum)."""


class Fp8Switch(nnx.Variable):
    """A projection's FP8 on/off switch (a bool; [layers] once the decoder layers are
    stacked), present only when some decoder layer stays BF16 (`fp8.bf16_layers`). Neither a
    parameter nor saved: it is fixed by the config, so `ModelParts` holds it as a constant."""


@dataclasses.dataclass(frozen=True)
class Gemm:
    """BF16 (no FP8): y = x @ w in the compute dtype. Base of every policy."""

    name: str = "none"
    bf16_layers: tuple[int, ...] = ()  # decoder layers that stay BF16 (negative: from the end)
    # Where the GEMMs run, bound once by `for_execution` (model/execution.py): policies that
    # partition their GEMM by hand (a kernel XLA cannot split) do so on this layout.
    layout: Layout | None = dataclasses.field(default=None, kw_only=True)

    def for_execution(self, target: Target, layout: Layout | None) -> Gemm:
        """This policy bound to the platform and layout it is compiled for."""
        return dataclasses.replace(self, layout=layout)

    @property
    def stateful(self) -> bool:
        return False

    @property
    def is_fp8(self) -> bool:
        return False

    def init_state(self) -> dict[str, nnx.Variable]:
        """The variables each projection keeps for this policy, by attribute name (the names
        are the checkpoint keys under the projection)."""
        return {}

    def update_state(self, state: dict[str, jax.Array], observed: jax.Array) -> dict:
        """One GEMM's state after an optimizer step, from the probe's cotangent `observed`
        [..., uses, 3] (amaxes of x, w, g per application; leading axes: stacked layers)."""
        return state

    @property
    def fuses_mlp(self) -> bool:
        """Whether this policy computes a whole MLP block (`fused_mlp`) rather than its three
        projections one by one."""
        return False

    def fused_mlp(self, x: jax.Array, ws: tuple, axes: tuple) -> jax.Array:
        """down(swiglu(x @ w_gate, x @ w_up)) for ws = (w_gate, w_up, w_down), in FP8."""
        raise AssertionError(f"the {self.name} policy computes the MLP's projections one by one")

    def fp8_dots(self, x: jax.Array, ws: tuple, states: tuple, uses: tuple, axes: tuple) -> tuple:
        """x @ w for each w in `ws` in FP8 (one quantization of x where the recipe allows)."""
        raise AssertionError("the BF16 policy has no FP8 path")

    def many(
        self,
        x: jax.Array,
        ws: tuple[jax.Array, ...],
        states: tuple[dict[str, jax.Array], ...] | None = None,
        *,
        uses: tuple[int, ...] | None = None,
        enabled: jax.Array | None = None,
        axes: tuple[tuple[str, str] | None, ...] | None = None,
    ) -> tuple[jax.Array, ...]:
        """x [tokens, in] @ w [in, out_i] for every w in `ws` (projections that share their
        input: q, k, v; gate, up). `enabled` (a traced bool) selects BF16 per layer; `axes`
        are each w's logical axis names (for policies that partition their GEMM by hand)."""
        ws = tuple(ws)
        n = len(ws)
        if not self.is_fp8:
            return tuple(jnp.dot(x, w) for w in ws)
        states = tuple(states) if states is not None else ({},) * n
        uses = tuple(uses) if uses is not None else (0,) * n
        axes = tuple(axes) if axes is not None else (None,) * n

        def fp8():
            return tuple(self.fp8_dots(x, ws, states, uses, axes))

        if enabled is None:
            return fp8()
        return jax.lax.cond(enabled, fp8, lambda: tuple(jnp.dot(x, w) for w in ws))

    def __call__(
        self,
        x: jax.Array,
        w: jax.Array,
        state: dict[str, jax.Array] | None = None,
        *,
        use: int = 0,
        enabled: jax.Array | None = None,
        axes: tuple[str, str] | None = None,
    ) -> jax.Array:
        """x [tokens, in] @ w [in, out]: `many` with one weight."""
        return self.many(x, (w,), (state or {},), uses=(use,), enabled=enabled, axes=(axes,))[0]

    def layer_mask(self, num_layers: int) -> tuple[bool, ...] | None:
        """Per layer, False for BF16 layers; None when every layer uses FP8 (no branch)."""
        if not self.is_fp8 or not self.bf16_layers:
            return None
        mask = [True] * num_layers
        for i in self.bf16_layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(
                    f"fp8.bf16_layers: {i} is not a layer of a {num_layers}-layer model"
                )
            mask[i] = False
        return tuple(mask)


BF16 = Gemm()  # the plain policy: no FP8 anywhere
