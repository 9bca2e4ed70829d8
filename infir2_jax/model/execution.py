"""The execution plan: everything that depends on the devices and the target, decided once.

`resolve_plan` turns an `ExecutionConfig` (what the user asked for) into an `ExecutionPlan`
(what runs): the layout, the target platform, the attention implementation and its
fallback, and the GEMM policy bound to both. The model receives the plan when it is built
(`Qwen2(cfg, rngs=..., plan=...)`) and reads it; nothing below consults the environment or
a context variable to decide what to compute.
"""

from __future__ import annotations

import dataclasses

from infir2_jax.fp8.base import BF16, Gemm
from infir2_jax.model.attention_impl import resolve_implementation
from infir2_jax.model.config import ExecutionConfig, ModelConfig
from infir2_jax.parallel.rules import Layout
from infir2_jax.target import Target, local_target

DEFAULT_EXECUTION = ExecutionConfig()


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How a model runs (hashable: modules keep it as a static attribute).

    layout: the mesh and rules table (None: one device, unsharded); target: the platform
    compiled for; attention: the resolved `execution.attention_impl` (None: one XLA call with
    an explicit mask); fallback_attention: what runs a batch the primary attention cannot
    take (cuDNN: rows of more than `execution.max_segments` segments); gemm: the projections'
    policy, bound to the target and layout."""

    execution: ExecutionConfig = DEFAULT_EXECUTION
    target: Target = Target()
    gemm: Gemm = BF16
    layout: Layout | None = None
    attention: str | None = None
    fallback_attention: str | None = None

    @property
    def context(self) -> int:
        """Devices each row is split over (context parallelism)."""
        return 1 if self.layout is None else self.layout.size("context")

    @property
    def segment_limit(self) -> int | None:
        """The most segments a row may hold for the primary attention (None: any number)."""
        return self.execution.max_segments if self.attention == "cudnn" else None

    def fallback(self) -> ExecutionPlan:
        """The plan for batches beyond `segment_limit`: the fallback attention, nothing else
        changed."""
        if self.fallback_attention is None:
            raise ValueError(f"attention {self.attention!r} has no fallback")
        return dataclasses.replace(self, attention=self.fallback_attention, fallback_attention=None)

    def describe_attention(self) -> str:
        resolved = self.attention or "xla"
        return f"{resolved} (auto)" if self.execution.attention_impl == "auto" else resolved


def resolve_plan(
    model: ModelConfig,
    execution: ExecutionConfig = DEFAULT_EXECUTION,
    *,
    gemm: Gemm = BF16,
    layout: Layout | None = None,
    target: Target | None = None,
    seq_len: int | None = None,
) -> ExecutionPlan:
    """The plan for `model` run as `execution` asks on `layout` (None: one device) for
    `target` (default: the layout's devices, else this process's), on rows of `seq_len`
    tokens (None: lengths are checked when traced). Raises ValueError for what cannot run
    there (an explicit flash attention the target lacks, an FP8 layer list that does not fit
    the model)."""
    if target is None:
        target = Target.of_devices(layout.mesh.devices.flat) if layout else local_target()
    gemm.layer_mask(model.num_layers)
    context = 1 if layout is None else layout.size("context")
    attention = resolve_implementation(
        execution.attention_impl, model.head_dim, model.dtype, target=target, context=context,
        seq_len=seq_len, block=execution.attention_block,
    )  # fmt: skip
    return ExecutionPlan(
        execution=execution,
        target=target,
        gemm=gemm.for_execution(target, layout),
        layout=layout,
        attention=attention,
        # cuDNN's packed form takes `max_segments` per row; our kernel takes any number.
        fallback_attention="pallas" if attention == "cudnn" else None,
    )
