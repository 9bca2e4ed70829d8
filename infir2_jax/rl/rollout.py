"""Rollout engines behind one small interface: `sync` the trainer's weights, `generate`
completions. `jax` runs the generation engine in this process on the trainer's own parameters
(same devices, time-sliced with training); `sglang` (rl/sglang.py) asks SGLang servers over
HTTP after exporting the weights for them to load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import jax

from infir2_jax.config import ConfigError, RunConfig
from infir2_jax.generate import Completion, Engine, SamplingParams
from infir2_jax.parallel.mesh import make_mesh
from infir2_jax.parallel.rules import DECODE_RULES, Layout
from infir2_jax.train.setup import Setup
from infir2_jax.train.state import Params


class RolloutEngine(Protocol):
    def sync(self, params: Params, version: int) -> None:
        """Makes `params` (the trainer's, after `version` steps) the weights sampled from.
        A second call with the same version does nothing."""

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Completion]]:
        """`sampling.n` completions per prompt, in prompt order, with the engine's
        log-probability of every sampled token (at the sampling temperature)."""

    def close(self) -> None: ...


class JaxRollout:
    """The in-process engine (generate/engine.py). Its mesh is the trainer's devices with the
    decode rules; context-parallel ranks of the training mesh serve as extra data-parallel
    slots (decoding one token needs no sequence split), so syncing is a reshard plus the cast
    to the compute dtype — no copy through the host."""

    def __init__(self, cfg: RunConfig, setup: Setup, params: Params, max_len: int):
        rl, train = cfg.rl, setup.layout
        parallel = cfg.parallel
        if train.size("context") > 1:  # fold context into data: same devices, same order
            parallel = type(parallel)(
                data=train.size("data") * train.size("context"),
                fsdp=train.size("fsdp"),
                tensor=train.size("tensor"),
                context=1,
            )
        devices = list(train.mesh.devices.transpose(0, 3, 1, 2).reshape(-1))  # data, context, ...
        layout = Layout(make_mesh(parallel, devices), DECODE_RULES, "decode")
        try:
            self.engine = Engine(
                cfg.model, params, gemm=setup.gemm, layout=layout, execution=cfg.execution,
                slots=rl.slots,
                steps_per_call=rl.steps_per_call, max_len=max_len,
            )  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"rl (jax rollouts): {e}") from None
        self.version: int | None = None

    def sync(self, params: Params, version: int) -> None:
        if version != self.version:
            self.engine.update_params(params)
            jax.block_until_ready(self.engine.params)
            self.version = version

    def generate(self, prompts, sampling):
        return self.engine.generate(prompts, sampling)

    def close(self) -> None:
        pass


def make_rollout(
    cfg: RunConfig, setup: Setup, params: Params, max_len: int, run_dir: Path
) -> RolloutEngine:
    """The engine `rl.rollout.engine` names."""
    rollout = cfg.rl.rollout
    if rollout.engine == "jax":
        return JaxRollout(cfg, setup, params, max_len)
    from infir2_jax.rl.sglang import SGLangRollout

    return SGLangRollout(
        rollout, cfg.model, run_dir / "rollout_weights",
        tokenizer_dir=cfg.rl.tokenizer, max_len=max_len,
    )  # fmt: skip
