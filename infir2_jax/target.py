"""The platform a run compiles for, asked once: from the run's devices, or from a named GPU
for a compile without one (the planner's deviceless H100/H200 compile)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Target:
    """`cuda`: an NVIDIA GPU of compute `capability` (major, minor); `cpu`: anything else,
    where the portable paths run (XLA attention, emulated or interpreted kernels)."""

    platform: Literal["cpu", "cuda"] = "cpu"
    capability: tuple[int, int] | None = None
    name: str = "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.platform == "cuda"

    @classmethod
    def of_devices(cls, devices: Sequence) -> Target:
        """The target of a run on `devices` (jax devices; the first one speaks for all)."""
        device = devices[0]
        capability = getattr(device, "compute_capability", None)
        if device.platform not in ("gpu", "cuda") or capability is None:  # CPU, ROCm
            return cls()
        major, minor = (int(x) for x in str(capability).split("."))
        return cls("cuda", (major, minor), getattr(device, "device_kind", "cuda"))

    @classmethod
    def named(cls, name: str) -> Target:
        """`cpu`, or a GPU of infir2_jax/gpu_targets (`h100`, `h200`) compiled for without one."""
        if name == "cpu":
            return cls()
        from infir2_jax.gpu_target import target_capability

        return cls("cuda", target_capability(name), name)


def local_target() -> Target:
    """The target of this process's default devices."""
    import jax

    return Target.of_devices(jax.devices())
