"""Running Mosaic GPU (Hopper) Pallas kernels on the CPU: GPU interpret mode, plus two patches.

jax 0.10.2's GPU interpreter (`jax._src.pallas.mosaic_gpu.interpret`) executes a kernel's
threads, barriers, TMA copies and wgmma on the CPU. It lacks two things our FP8 kernel uses;
both are patched here, in the tests only (the kernel's hardware path is untouched), and only
where the interpreter lacks them (jax 0.12's has both; `interpreter_has_both`):

1. Transposed wgmma operands. An 8-bit wgmma on Hopper needs both operands K-major, so the
   kernel passes B (stored [N, K] in SMEM) as `b.transpose((1, 0))`. The
   interpreter's wgmma callback turns every operand transform into an index range and
   fails on `TransposeTransform` ("'TransposeTransform' object has no attribute
   'indices'"). `_wgmma` below reads the operand through its index transforms and then
   applies the (trailing) transpose, computing the same acc += a @ b in FP32.

2. Clipped TMA stores. A TMA store of a tile that hangs over the edge of the GMEM array
   writes the in-bounds part and drops the rest; that is how the kernel handles partial
   M/N output tiles. The interpreter's `copy_smem_to_gmem` drops the whole store when any
   part is out of bounds, leaving those outputs unwritten. `_copy_smem_to_gmem` below
   writes the in-bounds part (what the hardware does).

The third hardware behaviour we rely on, TMA loads filling out-of-bounds elements with
zeros (partial M/N/K tiles), is an interpreter option, not a patch: `interpret_params()`
sets out_of_bounds_reads="uninitialized" with uninitialized_memory="zero". (That also
zero-fills fresh SMEM instead of NaN-filling it; the kernel never reads SMEM it did not
write.) The interpreter computes wgmma in FP32 and treats waits as no-ops, so it checks
arithmetic and indexing, not Hopper's accumulation precision or synchronisation.

A callback that raises inside the interpreter leaves the other simulated threads waiting
on barriers forever, so `run_interpreted` runs the kernel under a watchdog and fails
instead of hanging.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as _ipc
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state.types import TransposeTransform

_interpret_utils = gpu_callbacks.interpret_utils
_original_wgmma = gpu_callbacks.wgmma
_original_copy_smem_to_gmem = gpu_callbacks.copy_smem_to_gmem


def interpret_params() -> InterpretGPUParams:
    """GPU interpret mode with TMA's zero fill for out-of-bounds loads."""
    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


def _split_transpose(transforms) -> tuple[tuple, tuple[int, ...] | None]:
    """Index transforms (no-op tiling/swizzle dropped) and a trailing transpose, if any."""
    transforms = tuple(gpu_callbacks._remove_noop_transforms(tuple(transforms)))
    perm = None
    if transforms and isinstance(transforms[-1], TransposeTransform):
        perm = tuple(transforms[-1].permutation)
        transforms = transforms[:-1]
    if any(isinstance(t, TransposeTransform) for t in transforms):
        # The kernel only ever transposes last; anything else would be a new kernel shape
        # this patch was not written for: fail loudly rather than compute something wrong.
        raise ValueError(f"this interpreter patch handles a trailing transpose only: {transforms}")
    return jax.tree.map(int, transforms), perm


def _wgmma(
    *,
    token,
    device_id,
    grid_point_coords,
    thread_id,
    acc_allocation_key_as_array,
    acc_transforms,
    acc_dtype,
    a_allocation_key_as_array,
    a_transforms,
    b_allocation_key_as_array,
    b_transforms,
    source_info=None,
):
    """The interpreter's wgmma callback (acc += a @ b in acc_dtype), with transposed operands."""
    a_idx, a_perm = _split_transpose(a_transforms)
    b_idx, b_perm = _split_transpose(b_transforms)
    if a_perm is None and b_perm is None:
        return _original_wgmma(
            token=token,
            device_id=device_id,
            grid_point_coords=grid_point_coords,
            thread_id=thread_id,
            acc_allocation_key_as_array=acc_allocation_key_as_array,
            acc_transforms=acc_transforms,
            acc_dtype=acc_dtype,
            a_allocation_key_as_array=a_allocation_key_as_array,
            a_transforms=a_transforms,
            b_allocation_key_as_array=b_allocation_key_as_array,
            b_transforms=b_transforms,
            source_info=source_info,
        )
    shared_memory = gpu_callbacks._get_shared_memory()
    global_thread_id = shared_memory.get_global_thread_id(int(device_id), int(thread_id))
    logging_info = _interpret_utils.GPULoggingInfo(
        device_id=int(device_id),
        grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=int(thread_id),
        source_info=source_info,
    )

    def read(key_as_array, indexers, perm):
        key = gpu_callbacks.HostAllocationKey.from_array(key_as_array)
        value, _, _ = shared_memory.get_buffer_content(
            key, _interpret_utils.to_range(indexers), global_thread_id, logging_info=logging_info
        )
        assert value is not None
        return value if perm is None else np.transpose(value, perm)

    a = read(a_allocation_key_as_array, a_idx, a_perm)
    b = read(b_allocation_key_as_array, b_idx, b_perm)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
    acc_range = _interpret_utils.to_range(
        jax.tree.map(int, gpu_callbacks._remove_noop_transforms(tuple(acc_transforms)))
    )
    acc, _, _ = shared_memory.get_buffer_content(
        acc_key, acc_range, global_thread_id, logging_info=logging_info
    )
    shared_memory.store_buffer_content(
        acc_key,
        acc_range,
        acc + np.matmul(a, b, dtype=acc_dtype),
        global_thread_id,
        logging_info=logging_info,
    )
    return token


def _copy_smem_to_gmem(
    *,
    token,
    device_id,
    grid_point_coords,
    thread_id,
    src_allocation_key_as_array,
    src_transforms,
    dst_allocation_key_as_array,
    dst_transforms,
    predicate,
    source_info,
    commit_group,
    reduction_op,
):
    """The interpreter's SMEM->GMEM copy, writing the in-bounds part of a clipped tile."""
    if predicate is not None or reduction_op is not None:
        return _original_copy_smem_to_gmem(
            token=token,
            device_id=device_id,
            grid_point_coords=grid_point_coords,
            thread_id=thread_id,
            src_allocation_key_as_array=src_allocation_key_as_array,
            src_transforms=src_transforms,
            dst_allocation_key_as_array=dst_allocation_key_as_array,
            dst_transforms=dst_transforms,
            predicate=predicate,
            source_info=source_info,
            commit_group=commit_group,
            reduction_op=reduction_op,
        )
    shared_memory = gpu_callbacks._get_shared_memory()
    global_thread_id = shared_memory.get_global_thread_id(int(device_id), int(thread_id))
    src_key = gpu_callbacks.HostAllocationKey.from_array(src_allocation_key_as_array)
    dst_key = gpu_callbacks.HostAllocationKey.from_array(dst_allocation_key_as_array)
    src_range = _interpret_utils.to_range(
        jax.tree.map(int, gpu_callbacks._remove_noop_transforms(tuple(src_transforms)))
    )
    dst_range = _interpret_utils.to_range(
        jax.tree.map(int, gpu_callbacks._remove_noop_transforms(tuple(dst_transforms)))
    )
    value, _, _ = shared_memory.get_buffer_content(src_key, src_range, global_thread_id)
    assert value is not None
    with shared_memory.lock:
        shared_memory.mem[dst_key].set_in_bounds_portion(dst_range, value)
    return token


def interpreter_has_both() -> bool:
    """Whether this jax's interpreter already reads transposed operands (an `Access` with an
    axis permutation) and clips TMA stores (jax 0.12 does; 0.10.2 does neither)."""
    store = getattr(gpu_callbacks, "AsyncCopySmemToGmemTask", None)
    return hasattr(_interpret_utils, "to_access") and bool(
        getattr(store, "clips_out_of_bounds_destination", False)
    )


def install_patches() -> None:
    """Installs both callback patches where the interpreter lacks them (idempotent)."""
    if interpreter_has_both():
        return
    gpu_callbacks.wgmma = _wgmma
    gpu_callbacks.copy_smem_to_gmem = _copy_smem_to_gmem


def run_interpreted(fn, *args, timeout_s: float = 300.0):
    """fn(*args) with the patches installed, failing (not hanging) if it takes over timeout_s."""
    install_patches()
    result: dict = {}

    def target():
        try:
            result["value"] = jax.block_until_ready(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(
            f"interpreted kernel still running after {timeout_s:.0f} s: a simulated thread is "
            "probably waiting on a barrier after another one failed (see the log above)"
        )
    if "error" in result:
        _ipc.reset_gpu_interpret_mode_state()
        raise result["error"]
    return result["value"]
