"""The generation engine: prefill + KV-cache decode with continuous batching, on one device
or a mesh, from an HF directory, an Orbax checkpoint or live parameters.

A fixed number of slots (rows of the decode batch) share one preallocated `KVCache`. Waiting
samples are prefilled into free slots (the `n` samples of a prompt share one prefill), then
the slots decode together inside one jitted `lax.while_loop` of up to `steps_per_call`
tokens. The loop returns early when a slot finishes while samples wait, so a long response
never holds the batch: the freed slot is refilled and decoding continues. Shapes are static
per (slots, cache length) and per prefill bucket, so nothing compiles per token or per
prompt; the host only moves finished samples out and new prompts in.

Random draws depend only on (seed, prompt index, sample index, token index), never on which
slot or batch a sample ran in, so the same seed and inputs give the same outputs.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import multihost_utils
from tqdm import tqdm

from infir2_jax.config import ParallelConfig
from infir2_jax.fp8.base import BF16, Gemm
from infir2_jax.generate.sampling import PerRow, SamplingParams, TokenFilter, draw
from infir2_jax.model import ExecutionConfig, ModelConfig, Qwen2, resolve_plan
from infir2_jax.model.kv_cache import KVCache
from infir2_jax.model.parts import Params, split_model
from infir2_jax.parallel.mesh import make_mesh
from infir2_jax.parallel.params import param_shardings
from infir2_jax.parallel.rules import DECODE_RULES, Layout, activation_layout, constrain

FinishReason = str  # "stop" (a stop token or string) | "length" (max_new_tokens or the cache)


@dataclasses.dataclass
class Completion:
    """One sample: the sampled ids (a final stop token included), the log-probability of
    each (see generate/sampling.py), and the decoded text (stop tokens and strings cut)."""

    index: int
    sample: int
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Stats:
    """What one `generate` call did: tokens and seconds, prefill and decode apart."""

    samples: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_calls: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / max(self.decode_seconds, 1e-9)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / max(self.prefill_seconds, 1e-9)


@struct.dataclass
class Slots:
    """Device state of the decode batch, one entry per slot."""

    tokens: jax.Array  # [slots] int32: the last sampled token, the next decode input
    positions: jax.Array  # [slots] int32: where it goes (tokens in the cache so far)
    generated: jax.Array  # [slots] int32: tokens sampled so far
    budget: jax.Array  # [slots] int32: tokens this slot may sample
    active: jax.Array  # [slots] bool
    keys: jax.Array  # [slots, 2] uint32: the sample's base PRNG key

    @classmethod
    def empty(cls, slots: int) -> Slots:
        zeros = jnp.zeros((slots,), jnp.int32)
        state = cls(
            zeros, zeros, zeros, zeros, jnp.zeros((slots,), bool), jnp.zeros((slots, 2), jnp.uint32)
        )
        return state.constrained()

    def constrained(self) -> Slots:
        return jax.tree.map(lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1)), self)


def decode_layout(parallel: ParallelConfig, devices: list | None = None) -> Layout:
    """The mesh of `parallel.*` (data × tensor; fsdp counts as data) with the decode rules."""
    return Layout(make_mesh(parallel, devices), DECODE_RULES, "decode")


def _bucket(n: int, floor: int = 16) -> int:
    """Powers of two up to 1024, then multiples of 1024: few compilations, little padding."""
    if n <= 1024:
        return max(floor, 1 << (n - 1).bit_length())
    return -(-n // 1024) * 1024


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _sample_keys(seed: jax.Array, index: jax.Array, sample_index: jax.Array) -> jax.Array:
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i, s: jax.random.fold_in(jax.random.fold_in(base, i), s))(
        index, sample_index
    )


def _fetch(tree):
    """Device arrays (sharded over slots) whole on the host — on every process, so the host
    loop runs identically on each (multi-process: an all-gather)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _token_keys(keys: jax.Array, generated: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in)(keys, generated)


class Engine:
    """Samples from a Qwen2 model. `params`: the nested parameter dict (`nnx.to_pure_dict`
    of the model's `nnx.Param` state: what the trainer holds); `gemm`: the projections' matmul
    policy, BF16 or FP8 blockwise (`fp8_block`, the numerics of block-FP8 inference);
    `layout`: a mesh with the `decode` rules table (None: the default device); `execution`:
    the execution choices (attention kernel), resolved with both into the engine's plan.

    Parameters are cast to `cfg.dtype` and placed on the layout once, at construction (for
    FP32 master weights: one BF16 copy while the engine lives; `update_params` replaces it).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        gemm: Gemm = BF16,
        layout: Layout | None = None,
        execution: ExecutionConfig | None = None,
        slots: int = 16,
        steps_per_call: int = 32,
        max_len: int | None = None,
        tokenizer=None,
    ):
        if gemm.stateful:
            raise ValueError(
                f"fp8.recipe={gemm.name}: generation needs a stateless GEMM policy "
                "(none or blockwise)"
            )
        self.cfg = cfg
        self.layout = layout
        self.tokenizer = tokenizer
        self.slots = slots
        self.steps_per_call = steps_per_call
        self.max_len = max_len or cfg.max_position_embeddings
        self.stats = Stats()
        if slots < 1 or steps_per_call < 1:
            raise ValueError(
                f"generate: slots ({slots}) and steps_per_call ({steps_per_call}) must be >= 1"
            )
        data = 1 if layout is None else layout.size("data") * layout.size("fsdp")
        tensor = 1 if layout is None else layout.size("tensor")
        if slots % data:
            raise ValueError(f"generate: {slots} slots do not split over {data} data replicas")
        if cfg.num_kv_heads % tensor or cfg.num_heads % tensor:
            raise ValueError(
                f"generate: {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads do not split "
                f"over tensor={tensor}: each tensor-parallel rank needs whole kv heads"
            )
        if layout is not None and layout.size("context") > 1:
            raise ValueError("generate: context parallelism is not supported; use tensor/data")
        self._rows_floor = data
        self.plan = resolve_plan(cfg, execution or ExecutionConfig(), gemm=gemm, layout=layout)
        self._parts = split_model(cfg, self.plan)
        self._shardings = (
            None
            if layout is None
            else param_shardings(layout, self._parts.param_axes, self._parts.params)
        )
        self._cast = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(cfg.dtype), p))
        self.params = self._placed(params)
        self._insert = self._jit(self._insert_fn, static_argnames=("how",), donate_argnums=(1, 2))
        self._decode = self._jit(
            self._decode_fn, static_argnames=("how", "steps"), donate_argnums=(1, 2)
        )
        self._empty = {}

    @classmethod
    def from_model(cls, model: Qwen2, **kwargs) -> Engine:
        """An engine over a live model's parameters, GEMM policy and execution choices (the
        plan is resolved again for the engine's own layout)."""
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        plan = model.plan
        return cls(model.config, params, gemm=plan.gemm, execution=plan.execution, **kwargs)

    def update_params(self, params: Params) -> None:
        """New weights (an RL step): cast and placed like at construction."""
        self.params = self._placed(params)

    def _placed(self, params: Params) -> Params:
        # Cast where the weights are (e.g. the trainer's mesh, whose device order may differ
        # from the engine's), then move the compute-dtype copy to the engine's layout.
        if self._shardings is None:
            return self._cast(params)
        if not all(isinstance(a, jax.Array) for a in jax.tree.leaves(params)):
            params = jax.device_put(params, self._shardings)  # host arrays: straight to shards
        return jax.device_put(self._cast(params), self._shardings)

    # ----------------------------------------------------------------- jitted pieces
    def _jit(self, fn: Callable, **kwargs) -> Callable:
        layout = self.layout

        def traced(*args, **kw):
            with activation_layout(layout):
                return fn(*args, **kw)

        return jax.jit(traced, **kwargs)

    def _model(self, params: Params) -> Qwen2:
        return self._parts.bind(params)

    def _empty_state(self, length: int) -> tuple[KVCache, Slots]:
        if length not in self._empty:
            self._empty[length] = self._jit(
                lambda: (KVCache.zeros(self.cfg, self.slots, length), Slots.empty(self.slots))
            )
        return self._empty[length]()

    def _insert_fn(
        self, params, cache: KVCache, slots: Slots, prompts, lengths, sources, targets,
        budgets, index, sample_index, seed, stop_ids, filters=None, *,
        how: TokenFilter | PerRow,
    ):  # fmt: skip
        """Prefills `prompts` [rows, length] and starts sample i in slot `targets[i]` from
        row `sources[i]`: its first token is drawn from the prompt's last logits (`filters`
        [targets]: per-sample settings, with `how` a `PerRow`)."""
        logits, k, v = self._model(params).prefill(prompts, lengths)
        cache = cache.insert(k, v, sources, targets)
        keys = _sample_keys(seed, index, sample_index)
        first, logprob = draw(
            jnp.take(logits, sources, axis=0),
            _token_keys(keys, jnp.zeros_like(sources)),
            how,
            filters,
        )
        done = _is_stop(first, stop_ids) | (budgets <= 1)

        def put(field, values):
            return field.at[targets].set(values.astype(field.dtype), mode="drop")

        slots = Slots(
            tokens=put(slots.tokens, first),
            positions=put(slots.positions, jnp.take(lengths, sources)),
            generated=put(slots.generated, jnp.ones_like(first)),
            budget=put(slots.budget, budgets),
            active=put(slots.active, ~done),
            keys=put(slots.keys, keys),
        ).constrained()
        return cache, slots, first, logprob, done

    def _decode_fn(
        self, params, cache: KVCache, slots: Slots, stop_ids, keep, refill, filters=None, *,
        how: TokenFilter | PerRow, steps: int,
    ):  # fmt: skip
        """Up to `steps` tokens for every active slot. Stops early once no slot is active,
        or (if `refill`: samples are waiting) once some slot has finished. Returns the cache,
        the slots, and per slot the sampled tokens [slots, steps] (-1: none) and their
        log-probabilities."""
        model = self._model(params)
        slots = slots.replace(active=slots.active & keep)
        tokens = jnp.full((self.slots, steps), -1, jnp.int32)
        logprobs = jnp.zeros((self.slots, steps), jnp.float32)

        def running(carry):
            i, _, slots, _, _, finished = carry
            return (i < steps) & jnp.any(slots.active) & ~(refill & finished)

        def step(carry):
            i, cache, slots, tokens, logprobs, finished = carry
            logits, cache = model.decode(cache, slots.tokens, slots.positions)
            new, logprob = draw(logits, _token_keys(slots.keys, slots.generated), how, filters)
            active = slots.active
            tokens = tokens.at[:, i].set(jnp.where(active, new, -1))
            logprobs = logprobs.at[:, i].set(jnp.where(active, logprob, 0.0))
            generated = slots.generated + active
            done = active & (_is_stop(new, stop_ids) | (generated >= slots.budget))
            slots = slots.replace(
                tokens=jnp.where(active, new, slots.tokens),
                positions=slots.positions + active,
                generated=generated,
                active=active & ~done,
            )
            return i + 1, cache, slots, tokens, logprobs, finished | jnp.any(done)

        carry = (jnp.int32(0), cache, slots, tokens, logprobs, jnp.bool_(False))
        _, cache, slots, tokens, logprobs, _ = jax.lax.while_loop(running, step, carry)
        return cache, slots, tokens, logprobs

    # ----------------------------------------------------------------- the host loop
    def cache_length(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
        """The cache bucket for these prompts: room for the longest prompt plus
        `max_new_tokens`, capped at `max_len` (samples stop early, "length", if it binds)."""
        longest = max(len(p) for p in prompts)
        return min(_bucket(longest + max_new_tokens), self.max_len)

    def default_stop_ids(self) -> tuple[int, ...]:
        """EOS and `<|im_end|>` of the tokenizer (none without one)."""
        tok = self.tokenizer
        if tok is None:
            return ()
        ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        return tuple(sorted(i for i in ids if isinstance(i, int) and i != tok.unk_token_id))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        progress: bool = False,
        key_indices: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """`sampling.n` completions per prompt (token ids), in prompt order. Random draws
        depend on (sampling.seed, the prompt's key index, sample, token): the key index is the
        prompt's position unless `key_indices` gives one per prompt (in [0, 2**31)) — a server
        batching many requests keeps each request's samples independent of its batch."""
        sampling = sampling or SamplingParams()
        if not prompts:
            return []
        if key_indices is not None and len(key_indices) != len(prompts):
            raise ValueError(f"generate: {len(key_indices)} key indices for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"generate: prompt {i} is empty")
            if len(p) >= self.max_len:
                raise ValueError(
                    f"generate: prompt {i} has {len(p)} tokens; the cache holds "
                    f"max_len={self.max_len} (prompt + at least one new token)"
                )
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(
                    f"generate: prompt {i} has token id {bad[0]} outside the vocabulary "
                    f"[0, {self.cfg.vocab_size})"
                )
        if sampling.stop and self.tokenizer is None:
            raise ValueError("generate: stop strings need a tokenizer")
        keys = range(len(prompts)) if key_indices is None else key_indices
        return _Run(self, prompts, sampling, progress, keys).run()


class _Run:
    """One `Engine.generate` call: the queue of samples, the slot table, the results."""

    def __init__(
        self, engine: Engine, prompts, sampling: SamplingParams, progress: bool, key_indices
    ):
        self.engine, self.prompts, self.sampling = engine, prompts, sampling
        self.key_indices = list(key_indices)
        self.how = sampling.token_filter()
        stop = sampling.stop_token_ids
        stop = engine.default_stop_ids() if stop is None else stop
        self.stop_ids = jnp.asarray(stop or (-1,), jnp.int32)
        self.stop_set = set(stop)
        self.length = engine.cache_length(prompts, sampling.max_new_tokens)
        self.waiting = deque((i, s) for i in range(len(prompts)) for s in range(sampling.n))
        self.owner: list[tuple[int, int] | None] = [None] * engine.slots
        self.ids: dict[tuple[int, int], list[int]] = {}
        self.logprobs: dict[tuple[int, int], list[float]] = {}
        self.done: dict[tuple[int, int], Completion] = {}
        self.stats = engine.stats = Stats()
        self.bar = tqdm(
            total=len(self.waiting), unit="sample", desc="generate", disable=not progress
        )

    def run(self) -> list[list[Completion]]:
        eng = self.engine
        self.cache, self.slots = eng._empty_state(self.length)
        start = time.perf_counter()
        while self.waiting or any(o is not None for o in self.owner):
            free = [j for j, o in enumerate(self.owner) if o is None]
            if self.waiting and free:
                self._prefill(free)
            if any(o is not None for o in self.owner):
                self._decode()
            elapsed = time.perf_counter() - start
            total = self.stats.prefill_tokens + self.stats.decode_tokens
            self.bar.set_postfix_str(f"{total / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
        self.bar.close()
        n = self.sampling.n
        return [[self.done[(i, s)] for s in range(n)] for i in range(len(self.prompts))]

    def _prefill(self, free: list[int]) -> None:
        eng, sampling = self.engine, self.sampling
        batch = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        rows = list(dict.fromkeys(i for i, _ in batch))  # each prompt prefilled once
        longest = max(len(self.prompts[i]) for i in rows)
        width = min(_bucket(longest), self.length)
        num_rows = max(_bucket(len(rows), 1), eng._rows_floor)
        num_targets = min(_bucket(len(batch), 1), eng.slots)
        prompts = np.zeros((num_rows, width), np.int32)
        lengths = np.ones((num_rows,), np.int32)
        for r, i in enumerate(rows):
            prompts[r, : len(self.prompts[i])] = self.prompts[i]
            lengths[r] = len(self.prompts[i])
        pad = num_targets - len(batch)
        row_of = {i: r for r, i in enumerate(rows)}
        sources = np.array([row_of[i] for i, _ in batch] + [0] * pad, np.int32)
        targets = np.array(free[: len(batch)] + [eng.slots] * pad, np.int32)
        budgets = np.array(
            [min(sampling.max_new_tokens, self.length - len(self.prompts[i])) for i, _ in batch]
            + [1] * pad,
            np.int32,
        )
        index = np.array([self.key_indices[i] for i, _ in batch] + [0] * pad, np.int32)
        sample_index = np.array([s for _, s in batch] + [0] * pad, np.int32)
        t0 = time.perf_counter()
        self.cache, self.slots, first, logprob, done = eng._insert(
            eng.params, self.cache, self.slots, prompts, lengths, sources, targets, budgets,
            index, sample_index, np.int32(sampling.seed), self.stop_ids, how=self.how,
        )  # fmt: skip
        first, logprob, done = _fetch((first, logprob, done))
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prefill_tokens += int(lengths[: len(rows)].sum())
        for j, key in enumerate(batch):
            slot = int(targets[j])
            self.owner[slot] = key
            self.ids[key], self.logprobs[key] = [], []
            self._append(slot, [int(first[j])], [float(logprob[j])], finished=bool(done[j]))

    def _decode(self) -> None:
        eng = self.engine
        keep = np.array([o is not None for o in self.owner])
        t0 = time.perf_counter()
        self.cache, self.slots, tokens, logprobs = eng._decode(
            eng.params, self.cache, self.slots, self.stop_ids, keep, bool(self.waiting),
            how=self.how, steps=eng.steps_per_call,
        )  # fmt: skip
        tokens, logprobs, active = _fetch((tokens, logprobs, self.slots.active))
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_calls += 1
        for slot, key in enumerate(self.owner):
            if key is None:
                continue
            sampled = tokens[slot] >= 0
            self.stats.decode_tokens += int(sampled.sum())
            self._append(
                slot,
                tokens[slot][sampled].tolist(),
                logprobs[slot][sampled].tolist(),
                finished=not active[slot],
            )

    def _append(self, slot: int, ids: list[int], logprobs: list[float], finished: bool) -> None:
        key = self.owner[slot]
        out, lps = self.ids[key], self.logprobs[key]
        checked = len(out)
        out.extend(ids)
        lps.extend(logprobs)
        reason = "stop" if out and out[-1] in self.stop_set else "length"
        text = None
        if self.engine.tokenizer is not None and (finished or self.sampling.stop):
            text, cut = self._stop_string(out, checked)
            if cut is not None:
                del out[cut:], lps[cut:]
                finished, reason = True, "stop"
        if not finished:
            return
        if text is None and self.engine.tokenizer is not None:
            text = self._decode_text(out)
        self.done[key] = Completion(key[0], key[1], out, lps, reason, text)
        self.owner[slot] = None
        self.stats.samples += 1
        self.bar.update(1)

    def _decode_text(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def _stop_string(self, ids: list[int], checked: int) -> tuple[str | None, int | None]:
        return find_stop(self._decode_text, self.sampling.stop, ids, checked)


def find_stop(
    decode: Callable[[list[int]], str], stops: Sequence[str], ids: list[int], checked: int
) -> tuple[str | None, int | None]:
    """(text cut before the first stop string, the number of ids that produced it) when
    a stop string appears in the text of `ids` (its first `checked` ids had none).

    Only the new ids and as many before them as the longest stop string has UTF-8 bytes
    are decoded per call (a byte-level BPE token is at least one byte), so a long output
    is not re-decoded whole every call; the whole text is decoded once, on a hit."""
    if not stops:
        return None, None
    start = max(0, checked - max(len(s.encode("utf-8")) for s in stops))
    if not any(s in decode(ids[start:]) for s in stops):
        return None, None
    text = decode(ids)
    hits = [text.find(s) for s in stops if s in text]
    if not hits:  # the tail decoded differently from the whole: no stop in the text
        return text, None
    cut = len(ids)
    for cut in range(checked + 1, len(ids) + 1):  # the first token that completes one
        if any(s in decode(ids[:cut]) for s in stops):
            break
    return text[: min(hits)], cut
