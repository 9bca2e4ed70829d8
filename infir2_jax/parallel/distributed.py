"""Multi-host start-up: `jax.distributed.initialize()` from the launcher's environment.

Call once per process, before JAX touches a device. Three cases:
- `INFIR2_COORDINATOR=host:port`, `INFIR2_NUM_PROCESSES`, `INFIR2_PROCESS_ID` set: explicit
  (any launcher; also how the tests start 2 CPU processes on one machine);
- SLURM with more than one task (`SLURM_NTASKS` > 1): JAX's own SLURM detection — the
  coordinator is the first node of `SLURM_STEP_NODELIST` on a port derived from
  `SLURM_JOB_ID`, the process id is `SLURM_PROCID`, and with one task per GPU each process
  drives the GPU `SLURM_LOCALID` (launch/train.sbatch);
- otherwise one process, nothing to do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

EXPLICIT = ("INFIR2_COORDINATOR", "INFIR2_NUM_PROCESSES", "INFIR2_PROCESS_ID")


class DistributedError(RuntimeError):
    """The multi-process environment is incomplete or inconsistent."""


def initialize(environ: Mapping[str, str] = os.environ) -> str:
    """Joins the job's processes; returns how (for the run log)."""
    given = [name for name in EXPLICIT if name in environ]
    if given:
        if len(given) != len(EXPLICIT):
            missing = sorted(set(EXPLICIT) - set(given))
            raise DistributedError(f"{', '.join(given)} set but not {', '.join(missing)}")
        try:
            count, index = int(environ[EXPLICIT[1]]), int(environ[EXPLICIT[2]])
        except ValueError:
            raise DistributedError(
                f"{EXPLICIT[1]} and {EXPLICIT[2]} must be integers, got "
                f"{environ[EXPLICIT[1]]!r} and {environ[EXPLICIT[2]]!r}"
            ) from None
        if not 0 <= index < count:
            raise DistributedError(f"{EXPLICIT[2]}={index} is not in [0, {count})")
        jax.distributed.initialize(environ[EXPLICIT[0]], num_processes=count, process_id=index)
        return f"process {index}/{count} via {environ[EXPLICIT[0]]}"
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in environ:
        jax.distributed.initialize()
        return (
            f"SLURM job {environ.get('SLURM_JOB_ID')}: process {jax.process_index()}/"
            f"{jax.process_count()} on {environ.get('SLURMD_NODENAME', '?')}"
        )
    return "single process"
