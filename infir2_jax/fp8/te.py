"""TransformerEngine-JAX as an FP8 backend: `fp8.recipe: te_delayed | te_current`.

The seven projections call TE's functional `dense` (its quantize kernels and its cuBLASLt FP8
GEMM, for fprop, dgrad and wgrad) instead of our scaled dots; everything around them — model,
loss, optimizer, meshes, checkpoints — stays ours. TE's recipes:

- `te_current` (Float8CurrentScaling): per-tensor scales from this GEMM's own amaxes. Stateless.
- `te_delayed` (DelayedScaling): per-tensor scales from an amax history. Each GEMM keeps TE's
  quantizer state — a scale and an amax history for x, w and the output gradient — as
  `Fp8Scale` / `Fp8History` variables beside the kernel: outside the optimizer, saved in
  checkpoints, replicated. TE hands the amaxes it observed back as the "gradient" of its
  quantizers; we read them into a probe (`Fp8Probe`, max over micro-batches, uses of a layer
  and, like TE's own amax all-reduce, over every device), and once per optimizer step apply
  TE's own update (`DelayedScaleQuantizer.update`) with them (`TeGemm.update_state`).

Partitioning: under a mesh the GEMM runs per device inside our `partitioned_gemm` shard_map
(as `blockwise` does, and as Megatron runs TE per rank): FSDP weights are gathered in BF16
before TE sees them, row-parallel partial sums are added by us. TE does no collectives of its
own, so its `MeshResource` is empty. TE's per-tensor amaxes are therefore per device for
activations and gradients (TE's semantics: it reduces them only over a sequence split), and
over the whole weight.

Platforms: on a GPU, TE's custom calls (te_gemm_v2_ffi, te_dbias_quantize_ffi, ...). On any
other platform TE's own pure-JAX implementation of the same recipe (TE's switch
`NVTE_JAX_CUSTOM_CALLS=false`, set once from the plan's target: `use_custom_calls`), so its
numerics can be tested on a CPU.
TE must be importable: on a GPU node `launch/install_te_jax.sh`; without a GPU only with the
compile-only setup of `infir2_jax.fp8.te_deviceless` (plan, tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from infir2_jax.fp8.base import Fp8History, Fp8Probe, Fp8Scale, Gemm
from infir2_jax.fp8.dots import row_major
from infir2_jax.parallel.partitioned import partitioned_gemm

INSTALL_HINT = "install it with `bash launch/install_te_jax.sh` (README: TransformerEngine)"
_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


class TransformerEngineError(RuntimeError):
    """TransformerEngine-JAX is missing or cannot be loaded."""


def _preload_nccl() -> None:
    """libtransformer_engine.so needs libnccl.so.2 and has no RPATH to the nvidia-nccl wheel
    that jax's CUDA plugin installs; loading it first (RTLD_GLOBAL) lets the loader find it."""
    spec = importlib.util.find_spec("nvidia.nccl")
    if spec is None or not spec.submodule_search_locations:
        return
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libnccl.so.2"
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def te_installed() -> bool:
    """Whether TE's JAX extension is installed. (The core wheels alone already provide
    `transformer_engine/jax`'s Python files; the compiled extension is a distribution of its
    own, installed under transformer_engine/wheel_lib.)"""
    try:
        importlib.metadata.version("transformer_engine_jax")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def import_te():
    """`transformer_engine.jax`, or a TransformerEngineError that says what to do."""
    if not te_installed():
        raise TransformerEngineError(f"TransformerEngine-JAX is not installed; {INSTALL_HINT}")
    _preload_nccl()
    try:
        with warnings.catch_warnings():
            # TE warns when torch is installed without TE's PyTorch extension; we use JAX's.
            warnings.filterwarnings("ignore", message=".*Transformer Engine PyTorch.*")
            import transformer_engine.jax as te
    except (ImportError, OSError, RuntimeError) as err:
        raise TransformerEngineError(
            f"TransformerEngine-JAX is installed but does not load ({err}). TE runs on NVIDIA "
            "GPUs only; without one, compile-check the TE path with `python -m "
            "infir2_jax.plan --target h100 --set fp8.recipe=te_delayed` (it loads TE with "
            f"compile-only stand-ins). On a GPU node: {INSTALL_HINT}"
        ) from err
    return te


_SWITCH = "NVTE_JAX_CUSTOM_CALLS"
# The user's own value of TE's switch, saved when `use_custom_calls(False)` first replaced it.
_USER_SWITCH: list[str | None] = []


def use_custom_calls(on: bool) -> None:
    """Decides, at set-up and before anything is traced, which implementation TE traces (TE
    reads its switch NVTE_JAX_CUSTOM_CALLS while tracing; process-wide): its GPU custom calls
    (`on`: the target is a CUDA GPU; a user's own value, e.g. one primitive off, is left as
    it is) or its pure-JAX implementation of the same recipe (any other target)."""
    if not on:
        if not _USER_SWITCH:
            _USER_SWITCH.append(os.environ.get(_SWITCH))
        os.environ[_SWITCH] = "false"
    elif _USER_SWITCH:
        user = _USER_SWITCH.pop()
        if user is None:
            os.environ.pop(_SWITCH, None)
        else:
            os.environ[_SWITCH] = user


@contextlib.contextmanager
def _te_trace() -> Iterator[None]:
    """While TE traces: an empty MeshResource (we partition; TE adds no collectives)."""
    from transformer_engine.jax.sharding import MeshResource, global_shard_guard

    with global_shard_guard(MeshResource()):
        yield


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _spread(probe: jax.Array, devices: int) -> jax.Array:
    """`probe` [3] as one row per device [devices, 3], whose cotangent rows (each device's
    amaxes) combine by max, not by the sum a broadcast's transpose would take."""
    return jnp.broadcast_to(probe, (devices, *probe.shape))


def _spread_fwd(probe, devices):
    return _spread(probe, devices), None


def _spread_bwd(devices, _, ct):
    return (jnp.max(ct, axis=0),)


_spread.defvjp(_spread_fwd, _spread_bwd)


@dataclasses.dataclass(frozen=True)
class TeGemm(Gemm):
    """A TE recipe as a GEMM policy (see the module docstring)."""

    delayed: bool = False
    fwd: str = "e4m3"  # activations and weights
    bwd: str = "e5m2"  # output gradients
    margin: float = 0.0
    history: int = 1024
    max_uses: int = 2

    @property
    def stateful(self) -> bool:
        return self.delayed

    @property
    def is_fp8(self) -> bool:
        return True

    def for_execution(self, target, layout):
        use_custom_calls(target.is_cuda)
        return dataclasses.replace(self, layout=layout)

    def init_state(self) -> dict[str, nnx.Variable]:
        if not self.delayed:
            return {}
        return {
            # TE's initial quantizer state: scale 1, empty history (rows x, w, g).
            "fp8_scale": Fp8Scale(jnp.ones((3,), jnp.float32)),
            "fp8_history": Fp8History(jnp.zeros((3, self.history), jnp.float32)),
            "fp8_probe": Fp8Probe(jnp.zeros((self.max_uses, 3), jnp.float32)),
        }

    def _quantizers(self, scale: jax.Array | None, history: jax.Array | None):
        from transformer_engine.jax.quantize import QuantizerFactory, ScalingMode

        mode = (
            ScalingMode.DELAYED_TENSOR_SCALING
            if self.delayed
            else ScalingMode.CURRENT_TENSOR_SCALING
        )
        qs = QuantizerFactory.create_set(
            scaling_mode=mode, fwd_dtype=_DTYPES[self.fwd], bwd_dtype=_DTYPES[self.bwd]
        )
        if self.delayed:
            # Our state in TE's quantizers. (The scale TE recomputes while tracing is not
            # kept: `update_state` applies TE's update, margin included, once per step.)
            for row, q in enumerate((qs.x, qs.kernel, qs.dgrad)):
                q.scale = scale[row : row + 1]
                q.amax_history = history[row]
                q.margin = self.margin
        return qs

    def fp8_dots(self, x, ws, states, uses, axes):
        metas = tuple(self._meta(s, u) for s, u in zip(states, uses, strict=True))
        probes = tuple(
            s["fp8_probe"][u] if self.delayed else None for s, u in zip(states, uses, strict=True)
        )

        def local(a, bs, gathered, metas, probes):
            return tuple(
                _te_dense(self, a, g.gather(b) if g else b, meta, probe)
                for b, g, meta, probe in zip(bs, gathered, metas, probes, strict=True)
            )

        layout = self.layout
        if layout is None or None in axes:
            return local(x, ws, (None,) * len(ws), metas, probes)
        # TE's primitives do not type their results with the mesh axes they vary over, so
        # the shard_map runs unchecked (check_vma=False): it then adds every input's
        # cotangent over the axes the input is not split on. Right for x and w (partial
        # dgrads / wgrads); the probes enter one row per device so that their cotangents —
        # amaxes — meet in `_spread`'s max instead.
        rows = tuple(None if p is None else _spread(p, layout.mesh.size) for p in probes)

        def per_device(a, bs, gathered, metas, rows):
            return local(a, bs, gathered, metas, tuple(None if r is None else r[0] for r in rows))

        return partitioned_gemm(
            per_device, x, ws, axes, layout, replicated=(metas,), per_device=(rows,),
            check_vma=False,
        )  # fmt: skip

    def _meta(self, state, use):
        if not self.delayed:
            return None
        if use >= self.max_uses:
            raise ValueError(
                f"a te_delayed layer was applied {use + 1} times in one step; raise "
                f"fp8.max_uses (now {self.max_uses})"
            )
        return state["fp8_scale"], state["fp8_history"]

    def update_state(
        self, state: dict[str, jax.Array], observed: jax.Array
    ) -> dict[str, jax.Array]:
        """TE's DelayedScaleQuantizer.update for x, w and g of one GEMM (any leading layer
        axes) with this step's amaxes: the max over the probe rows [..., uses, 3]."""
        from transformer_engine.jax.quantize.helper import AmaxComputeAlgo
        from transformer_engine.jax.quantize.quantizer import DelayedScaleQuantizer as Q

        amax = jnp.max(observed, axis=-2)  # [..., 3]
        scale, history = state["fp8_scale"], state["fp8_history"]  # [..., 3], [..., 3, H]

        def one(history, scale, amax, dtype):  # [H], [1], [1]
            history = Q._update_amax_history(history, amax)
            scale = Q._compute_scale(history, scale, dtype, AmaxComputeAlgo.MAX, self.margin)
            return Q._roll_and_reset_amax_history(history), scale

        new_h, new_s = [], []
        for row, fmt in enumerate((self.fwd, self.fwd, self.bwd)):
            fn = partial(one, dtype=_DTYPES[fmt])
            for _ in range(history.ndim - 2):
                fn = jax.vmap(fn)
            h, s = fn(history[..., row, :], scale[..., row : row + 1], amax[..., row : row + 1])
            new_h.append(h)
            new_s.append(s[..., 0])
        return {"fp8_scale": jnp.stack(new_s, axis=-1), "fp8_history": jnp.stack(new_h, axis=-2)}


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _te_dense(gemm: TeGemm, x, w, meta, probe):
    """x [tokens, in] @ w [in, out] through TE's `dense` (its GPU kernels, or its pure-JAX
    implementation: see `use_custom_calls`); `meta` (scale [3], history [3, H]) and `probe`
    [3] for te_delayed, None for te_current. The probe's cotangent is the amaxes (x, w, g) TE
    observed here (on this device, under a mesh: `_spread` takes their max over devices)."""
    return _te_dense_fwd(gemm, x, w, meta, probe)[0]


def _te_dense_fwd(gemm, x, w, meta, probe):
    from transformer_engine.jax.dense import dense

    with _te_trace():
        scale, history = meta if meta is not None else (None, None)
        quantizers = gemm._quantizers(scale, history)
        y, vjp = jax.vjp(lambda a, b, q: dense(a, b, quantizer_set=q), x, w, quantizers)
    return y, jax.tree.map(_pinned, vjp)


def _pinned(a):
    """A residual pinned to the row-major layout (`dots.row_major`). TE keeps the transposed
    FP8 copy of x for wgrad; unpinned, XLA's layout assignment moved a transpose of it out of
    the layer scan onto the whole stack of residuals (BENCHMARKS.md, "TransformerEngine
    recipes", gives the cost). Pinned, any transpose stays per layer, as for blockwise."""
    return row_major(a) if isinstance(a, jax.Array) and a.ndim >= 2 else a


def _te_dense_bwd(gemm, vjp, g):
    with _te_trace():
        dx, dw, dq = vjp(g)
    if not gemm.delayed:
        return dx, dw, None, None
    # TE returns its quantizers after their update as their "gradient"; the amax each
    # observed is the newest history entry, which TE's update rolled to the end.
    amax = jnp.stack([q.amax_history[-1] for q in (dq.x, dq.kernel, dq.dgrad)])
    return dx, dw, None, amax


_te_dense.defvjp(_te_dense_fwd, _te_dense_bwd)
