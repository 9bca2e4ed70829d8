"""What differs between the JAX releases we support, asked in one place: jax 0.10.2 on Python
3.11 (requirements.txt) and jax 0.12 on Python 3.12-3.13 (requirements-jax012.txt). Code
elsewhere uses the APIs both releases share and asks here for the rest."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator

# jax's CUDA plugins by CUDA major version, newest first: the CUDA 12 plugin stops at jax
# 0.12.0.1, so compile-only GPU targets on newer jax come from the CUDA 13 one.
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def cuda_plugin() -> str | None:
    """The module name of the installed CUDA plugin of jax, or None without one."""
    for name in CUDA_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def jaxlib_version() -> tuple[int, int]:
    """(major, minor) of the installed jaxlib, read without importing JAX."""
    major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)


def deviceless_cudnn_attention() -> bool:
    """Whether XLA compiles cuDNN flash attention for a GPU on a machine without one. jax
    0.10.2 emits the cuDNN call and builds its graph on the device at run time. jax 0.12's XLA
    builds the graph while compiling and needs a cuDNN handle (a GPU) to pick its engine; its
    deviceless mode (`--xla_gpu_cudnn_deviceless_compilation_mode`) finds no engine for this
    graph with cuDNN 9.20 (checked 2026-12-07)."""
    return jaxlib_version() < (0, 12)


# A device kind of each compute capability we compile for without a GPU (the Triton lowering
# of jax 0.11 and 0.12 reads the target GPU from a device kind).
_DEVICE_KINDS = {(9, 0): "NVIDIA H100"}


# Where jax keeps the GPU lookup its Triton lowering uses: 0.12, then 0.11.
_GPU_INFO_MODULES = ("jax._src.gpu_info", "jax._src.pallas.triton.gpu_info")


@contextlib.contextmanager
def triton_target(capability: tuple[int, int]) -> Iterator[None]:
    """Lower Pallas Triton kernels for a GPU of `capability` on a machine without one. jax
    0.10.2 falls back to compute capability 9.0 by itself; jax 0.11 and 0.12 ask the default
    device's kind (`gpu_info.get_device_kind`: the CPU here) and fail, so it is answered with
    the target's kind while the step is lowered."""
    kind = _DEVICE_KINDS.get(tuple(capability))
    patched = []
    for name in _GPU_INFO_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if kind is not None and hasattr(module, "get_device_kind"):
            patched.append((module, module.get_device_kind))
            module.get_device_kind = lambda: kind
    try:
        yield
    finally:
        for module, saved in patched:
            module.get_device_kind = saved


def scan_num_consts(params: dict) -> int:
    """How many leading operands of a `scan` equation (its `params`) are loop constants: a
    `num_consts` count up to jax 0.11; since jax 0.12 an `ft_in` tree of (consts, carry, xs)."""
    if "num_consts" in params:
        return params["num_consts"]
    consts, _, _ = params["ft_in"].unpack()
    return len(consts)
