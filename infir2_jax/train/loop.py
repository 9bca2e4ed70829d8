"""The training run (CPT and SFT): config -> data, model, optimizer -> the shared runner with
the next-token step; logs and checkpoints as every objective does (train/runner.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax

from infir2_jax.config import RunConfig
from infir2_jax.data import OVERLONG_COUNTERS, DataPipeline, check_vocab, data_kind, sample_ids
from infir2_jax.data.pipeline import Component, source_rows
from infir2_jax.model.parts import ModelParts
from infir2_jax.parallel import describe
from infir2_jax.train.checkpointing import TrainCheckpointer
from infir2_jax.train.metrics import open_jsonl_for_resume
from infir2_jax.train.runner import Runner, Steps
from infir2_jax.train.setup import Setup, prepare, run_directory, start_state
from infir2_jax.train.sharding import global_batch, jit_eval_step, jit_train_step


class _Training(Runner):
    """CPT/SFT: each step the next batch of the data pipeline through the next-token step;
    every `train.eval_every` steps the validation loss. With a mixture (`data.sources`) it
    counts this host's rows per source (`rows/NAME`, kept in checkpoints) and logs their
    shares (`mix/NAME`): the realized proportions."""

    def __init__(
        self, cfg, setup: Setup, checkpointer, data, eval_batches, begun, out,
        components: list[Component],
    ):  # fmt: skip
        start, meta, resumed = begun
        super().__init__(
            cfg, checkpointer, out, start=start, meta=meta, resumed=resumed, data=data,
            log_every=cfg.train.log_every, eval_every=cfg.train.eval_every if eval_batches else 0,
        )  # fmt: skip
        self.layout, self.eval_batches = setup.layout, eval_batches
        self.kind = data_kind(cfg.data.kind)
        self.counters = {k: int(meta.get(k, 0)) for k in OVERLONG_COUNTERS}
        self.components = components if len(components) > 1 else []
        self.rows = {c.name: int(meta.get(f"rows/{c.name}", 0)) for c in self.components}
        self.attention = setup.plan.attention

        def build(parts: ModelParts):
            layout, shardings, micro = setup.layout, setup.state_sharding, cfg.train.micro_batches
            return (
                jit_train_step(layout, shardings, parts, setup.optimizer, setup.schedule, micro),
                jit_eval_step(layout, shardings, parts, micro),
            )

        self.steps = Steps(build, setup.parts, setup.fallback_parts, setup.plan.segment_limit, out)
        record = cfg.data.record_samples and jax.process_index() == 0
        self.samples = (
            open_jsonl_for_resume(self.run_dir / "samples.jsonl", start) if record else None
        )
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self._last = (time.perf_counter(), start)  # (time, step) of the last logged step

    def step(self, state, step):
        local = next(self.data)
        check_vocab(local, self.cfg.model.vocab_size)
        if self.samples is not None:
            self.samples.write(json.dumps({"step": step + 1, "samples": sample_ids(local)}) + "\n")
        for name, count in self.kind.count(local).items():
            self.counters[name] += count
        if self.components:
            for name, count in source_rows(self.components, local).items():
                self.rows[name] += count
        return self.steps.for_batch(local)[0](state, global_batch(self.layout, local))

    def log_values(self, state, raw, done):
        metrics = jax.device_get(raw)
        now = time.perf_counter()
        rate = self.tokens_per_step * (done - self._last[1]) / (now - self._last[0])
        self._last = (now, done)
        total = max(sum(self.rows.values()), 1)
        mix = {f"mix/{name}": n / total for name, n in self.rows.items()}
        return {**metrics, **{k: self.counters[k] for k in self.kind.counters}, **mix}, rate

    def after_step(self, state, done):
        if not self.eval_due(done):
            return
        started = time.perf_counter()
        loss_sum, tokens = 0.0, 0.0
        for batch in self.eval_batches:
            eval_step = self.steps.for_batch(batch)[1]
            result = jax.device_get(eval_step(state, global_batch(self.layout, batch)))
            loss_sum += float(result["loss_sum"])
            tokens += float(result["tokens"])
        self.logger.eval_took(time.perf_counter() - started)
        self.logger.log_eval(done, loss_sum / max(tokens, 1.0), tokens)
        self.history.append({"step": done, "eval_loss": loss_sum / max(tokens, 1.0)})

    def checkpoint_meta(self):
        rows = {f"rows/{name}": n for name, n in self.rows.items()}
        return {**self.counters, **rows, **super().checkpoint_meta()}

    def close(self):
        super().close()
        if self.samples is not None:
            self.samples.close()


def train(cfg: RunConfig, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Runs (or resumes) training to `train.steps`; returns the metrics logged by this call."""
    with run_directory(Path(cfg.train.run_dir)) as run_dir:  # removed if set-up fails
        setup = prepare(cfg)
        pipeline = DataPipeline(
            cfg.data,
            seq_len=cfg.train.seq_len,
            global_batch=cfg.train.batch_size,
            seed=cfg.train.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        data = pipeline.train_iterator()
        eval_batches = pipeline.eval_batches(cfg.train.eval_batches) if cfg.train.eval_every else []
        checkpointer = TrainCheckpointer(run_dir / "checkpoints", cfg.checkpoint)
        state, start, meta, resumed = start_state(cfg, setup, checkpointer, data, out)
        runner = _Training(
            cfg, setup, checkpointer, data, eval_batches, (start, meta, resumed), out,
            pipeline.components,
        )  # fmt: skip
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"mesh: {describe(setup.layout)}", file=out, flush=True)
    if len(pipeline.components) > 1:
        total = sum(c.weight for c in pipeline.components)
        mixture = ", ".join(
            f"{c.name} {c.weight / total:.3f} ({len(c.source):,} documents)"
            for c in pipeline.components
        )
        print(f"data mixture (share of rows): {mixture}", file=out, flush=True)
    print(
        f"model: {n_params:,} parameters | "
        f"batch {cfg.train.batch_size}×{cfg.train.seq_len} ({cfg.data.kind}, "
        f"{cfg.data.source if cfg.data.sources is None else 'mixture'}) | "
        f"fp8 {cfg.fp8.recipe} | attention {setup.plan.attention or 'xla'} | "
        f"steps {start}->{cfg.train.steps}",
        file=out,
        flush=True,
    )
    return runner.run(state)
