"""Checkpoint integrity: a checksum manifest per step directory, and the checks a restored
state must pass before a run trusts it.

Orbax verifies neither the bytes it reads back nor their values: a flipped block in a data
file restores as garbage numbers, silently. So once a step directory is complete, every file
in it is summed (CRC-32, at disk speed) into `checksums.json` beside them, off the training
thread; a restore re-reads the files against that manifest first, then checks each stored
array's dtype against what the run expects and every restored parameter and optimizer
moment for finiteness.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp

from infir2_jax.checkpoint.hf_io import CheckpointError

MANIFEST = "checksums.json"
_CHUNK = 1 << 24


class CheckpointCorrupt(CheckpointError):
    """A checkpoint failed verification; the message names the file or tensor."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Sums every file of a complete step directory into its manifest (written atomically)."""
    sums = {str(p.relative_to(step_dir)): _crc32(p) for p in _files(step_dir)}
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"crc32": sums}, indent=0))
    os.replace(tmp, step_dir / MANIFEST)


def verify_manifest(step_dir: Path) -> bool:
    """Raises CheckpointCorrupt naming the first file that differs from the manifest; False
    when the step has no manifest (written before manifests existed, or cut short)."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return False
    try:
        sums = json.loads(manifest.read_text())["crc32"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(f"{manifest}: unreadable ({e!r})") from None
    for name, expected in sums.items():
        path = step_dir / name
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: missing")
        if _crc32(path) != expected:
            raise CheckpointCorrupt(f"{path}: contents differ from when it was saved")
    return True


class ManifestWriter:
    """Writes each saved step's manifest once Orbax has committed the step directory (an
    async save renames it into place when complete), in a background thread."""

    def __init__(self, directory: Path, poll: float = 0.2):
        self.directory, self.poll = directory, poll
        self._threads: list[threading.Thread] = []

    def after_save(self, step: int) -> None:
        thread = threading.Thread(target=self._write, args=(step,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _write(self, step: int) -> None:
        step_dir = self.directory / str(step)
        while not (step_dir / "_CHECKPOINT_METADATA").is_file():
            if not any(self.directory.glob(f"{step}.orbax-checkpoint-tmp*")) and not (
                step_dir.exists()
            ):
                return  # the save failed, or the step was rotated away: nothing to sum
            time.sleep(self.poll)
        with contextlib.suppress(FileNotFoundError):  # rotated away while being summed
            write_manifest(step_dir)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads = []


def check_dtypes(stored: dict, expected: dict, where: str) -> None:
    """Stored array metadata (Orbax's, flattened by path) against the abstract state's."""
    for path, like in expected.items():
        meta = stored.get(path)
        if meta is None:
            raise CheckpointCorrupt(f"{where}: no array {'/'.join(path)}")
        if tuple(meta.shape) != tuple(like.shape) or jnp.dtype(meta.dtype) != like.dtype:
            raise CheckpointCorrupt(
                f"{where}: {'/'.join(path)} is stored as {jnp.dtype(meta.dtype).name}"
                f"{tuple(meta.shape)}, the run expects {like.dtype.name}{tuple(like.shape)}"
            )


@jax.jit
def _finite(tree):
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def check_finite(tree, where: str) -> None:
    """Every floating array of `tree` finite, else CheckpointCorrupt naming the first that is
    not."""
    floats = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else None, tree)
    flags = jax.device_get(_finite(floats))
    for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]:
        if not ok:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise CheckpointCorrupt(f"{where}: {name} holds non-finite values")
