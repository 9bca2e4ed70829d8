"""Compile-only support: TransformerEngine-JAX on a machine without a GPU.

Used by `python -m infir2_jax.plan --target h100`, the tests and `bench/fp8_curves.py` (TE's
pure-JAX implementation on the CPU), never by training. Two things stand between TE and a
machine with no CUDA driver:

- Import: TE loads every cuDNN library, and cuDNN's runtime-compiled engine library links six
  CUDA driver functions (`cuModuleLoadData`, `cuTensorMapEncodeTiled`, ...), so the dynamic
  loader wants a `libcuda.so.1`. `stub_driver()` builds one whose functions all return
  CUDA_ERROR_NO_DEVICE and loads it process-wide; nothing can run through it.
- Tracing: TE sizes its GEMM workspace and picks kernels from the GPU's compute capability,
  which it asks the driver for (`transformer_engine_jax.get_device_compute_capability`), and
  that raises without one. `capability_shim(90)` answers for the GPU being compiled for.

`enable(capability)` does what this machine needs: the stub only where no driver library
exists, the capability answer wherever the driver sees no GPU (also a login node with a
driver); on a machine with a GPU it changes nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import subprocess
import tempfile
from pathlib import Path

# The driver functions cuDNN's and TE's libraries link (`nm -D --undefined-only`): each
# returns CUDA_ERROR_NO_DEVICE (100); the error-string queries answer with a fixed text.
_STUB_SOURCE = r"""
typedef int CUresult;
static const char *kMessage = "infir2-jax stub libcuda: no CUDA driver (compile-only)";
#define NO_DEVICE(name) CUresult name(void) { return 100; }
NO_DEVICE(cuInit)
NO_DEVICE(cuCtxGetCurrent)
NO_DEVICE(cuFuncSetAttribute)
NO_DEVICE(cuLaunchKernel)
NO_DEVICE(cuLaunchKernelEx)
NO_DEVICE(cuModuleGetFunction)
NO_DEVICE(cuModuleLoadData)
NO_DEVICE(cuModuleLoadDataEx)
NO_DEVICE(cuModuleUnload)
NO_DEVICE(cuTensorMapEncodeIm2col)
NO_DEVICE(cuTensorMapEncodeTiled)
NO_DEVICE(cuDriverGetVersion)
NO_DEVICE(cuDeviceGetCount)
CUresult cuGetErrorString(CUresult error, const char **text) { *text = kMessage; return 0; }
CUresult cuGetErrorName(CUresult error, const char **text) { *text = kMessage; return 0; }
"""

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infir2_jax"
_stub_loaded = False  # the stub answers to libcuda.so.1 in this process


class DevicelessError(RuntimeError):
    """The compile-only TE setup cannot be made here (no C compiler, TE missing)."""


def cuda_devices() -> int | None:
    """GPUs the CUDA driver of this machine sees: None without a driver library, 0 with a
    driver but no GPU (a login node, a CPU container)."""
    if _stub_loaded:
        return None  # what answers to libcuda.so.1 now is our stub
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def build_stub_driver(directory: Path | None = None) -> Path:
    """`libcuda.so.1` with the stub functions (built once with the system C compiler, in a
    cache directory named by the source's hash)."""
    digest = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:12]
    directory = directory or CACHE / f"stub_cuda-{digest}"
    target = directory / "libcuda.so.1"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        source, built = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        source.write_text(_STUB_SOURCE)
        command = [compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", built, source]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            raise DevicelessError(
                f"building the stub libcuda.so.1 with {compiler!r} failed: {detail}"
            ) from err
        os.replace(built, target)  # atomic: a concurrent process sees all of it or nothing
    return target


def stub_driver() -> Path:
    """Loads the stub driver process-wide (RTLD_GLOBAL), so that libraries asking for
    `libcuda.so.1` get it. Only call where no driver library exists."""
    global _stub_loaded
    path = build_stub_driver()
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _stub_loaded = True
    return path


def capability_shim(capability: int) -> None:
    """TE's compute-capability query answers `capability` (e.g. 90 for Hopper) for every
    device, including where TE imported the function by name."""
    import transformer_engine_jax

    # The module, not the `gemm` function that `cpp_extensions` re-exports under that name.
    gemm = importlib.import_module("transformer_engine.jax.cpp_extensions.gemm")

    def get_device_compute_capability(device: int = 0) -> int:
        return capability

    transformer_engine_jax.get_device_compute_capability = get_device_compute_capability
    gemm.get_device_compute_capability = get_device_compute_capability
    # TE caches what it derived from the capability; a new answer must reach those too.
    device_utils = importlib.import_module("transformer_engine.jax.quantize.device_utils")
    device_utils.get_device_compute_capability.cache_clear()
    device_utils.is_fp8_gemm_with_all_layouts_supported.cache_clear()


def enable(capability: int = 90) -> bool:
    """Makes TE importable and traceable here if this machine has no GPU; returns whether
    the compile-only setup is active (False where the CUDA driver sees a GPU: there TE needs
    none of it)."""
    devices = cuda_devices()
    if devices:
        return False
    import jax

    if not jax.config.jax_platforms:
        # Without a GPU there is nothing but the CPU to run on; and with the stub loaded,
        # jax's CUDA plugin would try it and log an initialization error.
        jax.config.update("jax_platforms", "cpu")
    if devices is None and not _stub_loaded:
        stub_driver()  # no driver library at all: TE's libraries need one to load
    from infir2_jax.fp8.te import import_te

    import_te()
    capability_shim(capability)
    return True
