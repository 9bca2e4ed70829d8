"""Pre-tokenizing a corpus into ArrayRecord shards (the work of `python -m infir2_jax.prepare`,
whose docstring says what is written)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from infir2_jax.checkpoint.hf_io import atomic_output_dir
from infir2_jax.config import DataConfig
from infir2_jax.data.kinds import data_kind
from infir2_jax.data.pipeline import needs_tokenizer, open_source, split_bounds
from infir2_jax.data.records import PREPARED_INFO, DataError
from infir2_jax.data.tokenizer import LazyTokenizer

CHUNK = 256  # documents per task handed to a worker

_worker: dict = {}


def _init_worker(cfg: DataConfig, source) -> None:
    # The opened source (its line index) travels once per worker, not once per task.
    _worker["cfg"], _worker["source"] = cfg, source


def _encode_range(bounds: tuple[int, int]) -> list[bytes]:
    start, stop = bounds
    cfg: DataConfig = _worker["cfg"]
    source = _worker["source"]
    encode = data_kind(cfg.kind).encode(cfg, LazyTokenizer(cfg.tokenizer, cfg.chat_template))
    return [encode(source[i]).astype(np.int32).tobytes() for i in range(start, stop)]


def _encoded(cfg: DataConfig, source, workers: int) -> Iterator[bytes]:
    tasks = [(s, min(s + CHUNK, len(source))) for s in range(0, len(source), CHUNK)]
    if workers <= 1:
        _init_worker(cfg, source)
        for task in tasks:
            yield from _encode_range(task)
        return
    # spawn, not fork: the parent may hold threads (tokenizers, JAX) that fork would break.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(cfg, source)) as pool:
        for records in pool.imap(_encode_range, tasks):  # in order
            yield from records


def prepare(
    cfg: DataConfig,
    out_dir: str | os.PathLike,
    *,
    seq_len: int | None = None,
    docs_per_shard: int = 100_000,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Writes the prepared shards and `prepared.json`; returns the summary. For SFT with
    `seq_len`, the summary includes the packed rows of one epoch of the train split (to size
    `train.steps` for a number of epochs)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    if cfg.sources is not None:
        raise DataError(
            "data.sources: prepare one corpus at a time (data.path), then list the prepared "
            "directories in data.sources with source: prepared"
        )
    if cfg.source in ("synthetic", "prepared"):
        raise DataError(f"data.source={cfg.source}: nothing to prepare (already tokens)")
    source = open_source(cfg)  # validates the files (JSONL lines) before any work
    if needs_tokenizer(cfg):
        LazyTokenizer(cfg.tokenizer, cfg.chat_template).get()  # a missing tokenizer fails now
    kind = data_kind(cfg.kind)
    started = time.perf_counter()
    shards, tally, writer = [], kind.tally(), None
    with atomic_output_dir(Path(out_dir)) as tmp:
        bar = tqdm(total=len(source), unit="doc", disable=not progress, file=sys.stderr)
        for i, record in enumerate(_encoded(cfg, source, workers)):
            if i % docs_per_shard == 0:
                if writer is not None:
                    writer.close()
                shards.append(f"shard-{len(shards):05d}.array_record")
                writer = ArrayRecordWriter(str(tmp / shards[-1]), "group_size:1")
            writer.write(record)
            tally.add(np.frombuffer(record, np.int32))
            bar.update(1)
        bar.close()
        if writer is not None:
            writer.close()
        train = split_bounds(len(source), cfg.split)[0]
        summary = {
            "kind": kind.name,
            "documents": len(source),
            **tally.summary(train, seq_len, cfg.pack_bins),
            "shards": shards,
            "source": cfg.source,
            "path": cfg.path,
            "tokenizer": cfg.tokenizer,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / PREPARED_INFO).write_text(json.dumps(summary, indent=2))
    return summary
