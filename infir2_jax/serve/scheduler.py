"""Many HTTP requests, one generation engine, scheduled per request: a long-lived thread owns
the engine's slot table and KV cache (one, `max_len` tokens per slot), admits waiting samples
of any request into free slots between decode chunks (`steps_per_call` tokens, cut short when
a slot finishes while samples wait), and finishes or cancels samples per request. Each slot
samples with its own request's settings (temperature, top-k/p, min-p, key, budget, stop
strings), so a long request never holds up a short one and a cancelled request (its client
left) frees its slots at the next chunk.

Each request's random draws depend only on its own seed and prompt index (the engine's key
indices) and the sample and token index, never on its slot or neighbours: a seeded request
returns the same samples alone or in a crowd.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

from infir2_jax.generate import Completion, Engine, SamplingParams
from infir2_jax.generate.engine import _bucket, _fetch, find_stop
from infir2_jax.generate.sampling import PerRow, RowFilters

# listener(prompt index, sample index, new token ids, the Completion once finished else None)
Listener = Callable[[int, int, list[int], Completion | None], None]


def request_keys(seed: int | None, count: int) -> list[int]:
    """Key indices for a request's prompts: from its seed, or fresh random ones."""
    rng = np.random.default_rng(None if seed is None else [seed, 0x5EED])
    return [int(k) for k in rng.integers(0, 2**31, count)]


@dataclasses.dataclass(eq=False)
class Ticket:
    """One submitted request: its future (`sampling.n` completions per prompt) and state."""

    prompts: list[list[int]]
    sampling: SamplingParams
    keys: list[int]
    future: Future
    listener: Listener | None = None
    cancelled: bool = False
    done: dict[tuple[int, int], Completion] = dataclasses.field(default_factory=dict)

    def finish(self, key: tuple[int, int], completion: Completion) -> None:
        self.done[key] = completion
        total = len(self.prompts) * self.sampling.n
        if len(self.done) == total and not self.future.done():
            n = self.sampling.n
            result = [[self.done[(i, s)] for s in range(n)] for i in range(len(self.prompts))]
            self.future.set_result(result)


@dataclasses.dataclass(eq=False)
class _Sample:
    ticket: Ticket
    prompt: int
    index: int
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.stop_ids = np.asarray(engine.default_stop_ids() or (-1,), np.int32)
        self.stop_set = set(engine.default_stop_ids())
        self.inbox: queue.Queue[Ticket | None] = queue.Queue()
        self.waiting: deque[_Sample] = deque()
        self.owner: list[_Sample | None] = [None] * engine.slots
        self.filters: list = [SamplingParams(temperature=0).token_filter()] * engine.slots
        self.batches: list[int] = []  # requests sharing each decode call (for the tests)
        self.cancelled = 0  # samples dropped by a cancellation (from the queue or a slot)
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------- the HTTP side
    def submit(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, seed: int | None,
        listener: Listener | None = None,
    ) -> Ticket:  # fmt: skip
        """Queues a request; its ticket's future gets `sampling.n` completions per prompt."""
        ticket = Ticket(
            [list(p) for p in prompts], sampling, request_keys(seed, len(prompts)), Future(),
            listener,
        )  # fmt: skip
        self.inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drops the request's waiting samples and frees its slots (at the next chunk)."""
        ticket.cancelled = True
        ticket.future.cancel()
        self.inbox.put(ticket)  # wakes the thread

    def busy_slots(self) -> int:
        return sum(o is not None for o in self.owner)

    def idle(self) -> bool:
        return not self.waiting and self.busy_slots() == 0 and self.inbox.empty()

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=60)

    # ----------------------------------------------------------------- the thread
    def _loop(self) -> None:
        self.cache, self.slots = self.engine._empty_state(self.engine.max_len)
        while True:
            busy = bool(self.waiting) or self.busy_slots() > 0
            try:
                item = self.inbox.get(block=not busy)
                while True:
                    if item is None:
                        self._fail_all(RuntimeError("the server is shutting down"))
                        return
                    if not item.cancelled:
                        self._enqueue(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            self._drop_cancelled()
            try:
                free = [j for j, o in enumerate(self.owner) if o is None]
                if self.waiting and free:
                    self._prefill(free)
                if self.busy_slots():
                    self._decode()
            except Exception as e:  # noqa: BLE001 - every request in flight learns why
                self._fail_all(e)
                self.cache, self.slots = self.engine._empty_state(self.engine.max_len)

    def _enqueue(self, ticket: Ticket) -> None:
        for i in range(len(ticket.prompts)):
            for s in range(ticket.sampling.n):
                self.waiting.append(_Sample(ticket, i, s))

    def _drop_cancelled(self) -> None:
        kept = deque(s for s in self.waiting if not s.ticket.cancelled)
        self.cancelled += len(self.waiting) - len(kept)
        self.waiting = kept
        for j, sample in enumerate(self.owner):
            if sample is not None and sample.ticket.cancelled:
                self.owner[j] = None  # `keep` masks the slot off in the next decode call
                self.cancelled += 1

    def _fail_all(self, error: Exception) -> None:
        tickets = {s.ticket for s in self.waiting} | {s.ticket for s in self.owner if s}
        for t in tickets:
            if not t.future.done():
                t.future.set_exception(error)
        self.waiting.clear()
        self.owner = [None] * self.engine.slots

    def _prefill(self, free: list[int]) -> None:
        eng = self.engine
        batch = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        prompts_of = {(id(s.ticket), s.prompt): s.ticket.prompts[s.prompt] for s in batch}
        rows = list(prompts_of)  # each prompt prefilled once for its samples
        width = min(_bucket(max(len(p) for p in prompts_of.values())), eng.max_len)
        # Rows and targets padded alike (few prefill shapes to compile: n = 1 is the rule).
        num_targets = min(_bucket(len(batch), 1), eng.slots)
        num_rows = max(_bucket(len(rows), 1), eng._rows_floor, num_targets)
        prompts = np.zeros((num_rows, width), np.int32)
        lengths = np.ones((num_rows,), np.int32)
        for r, key in enumerate(rows):
            prompts[r, : len(prompts_of[key])] = prompts_of[key]
            lengths[r] = len(prompts_of[key])
        pad = num_targets - len(batch)
        row_of = {key: r for r, key in enumerate(rows)}
        sources = [row_of[(id(s.ticket), s.prompt)] for s in batch] + [0] * pad
        targets = free[: len(batch)] + [eng.slots] * pad
        budgets = [self._budget(s) for s in batch] + [1] * pad
        index = [s.ticket.keys[s.prompt] for s in batch] + [0] * pad
        sample_index = [s.index for s in batch] + [0] * pad
        filters = [s.ticket.sampling.token_filter() for s in batch]
        filters += [filters[0]] * pad
        i32 = lambda x: np.asarray(x, np.int32)  # noqa: E731
        self.cache, self.slots, first, logprob, done = eng._insert(
            eng.params, self.cache, self.slots, prompts, lengths, i32(sources), i32(targets),
            i32(budgets), i32(index), i32(sample_index), np.int32(0), self.stop_ids,
            RowFilters.of(filters), how=self._how(filters),
        )  # fmt: skip
        first, logprob, done = _fetch((first, logprob, done))
        for j, sample in enumerate(batch):
            self.owner[targets[j]] = sample
            self.filters[targets[j]] = filters[j]
            self._append(targets[j], [int(first[j])], [float(logprob[j])], bool(done[j]))

    def _budget(self, s: _Sample) -> int:
        room = self.engine.max_len - len(s.ticket.prompts[s.prompt])
        return min(s.ticket.sampling.max_new_tokens, room)

    @staticmethod
    def _how(filters) -> PerRow:
        sampled = [f for f in filters if f.temperature]
        truncate = any(f.top_k or f.top_p < 1 or f.min_p > 0 for f in sampled)
        return PerRow(truncate, draws=bool(sampled))

    def _decode(self) -> None:
        eng = self.engine
        keep = np.array([o is not None for o in self.owner])
        # The chunk ends as soon as any slot finishes (`refill`): its answer goes out now.
        self.batches.append(len({id(o.ticket) for o in self.owner if o is not None}))
        live = [f for f, o in zip(self.filters, self.owner, strict=True) if o is not None]
        self.cache, self.slots, tokens, logprobs = eng._decode(
            eng.params, self.cache, self.slots, self.stop_ids, keep, True,
            RowFilters.of(self.filters), how=self._how(live), steps=eng.steps_per_call,
        )  # fmt: skip
        tokens, logprobs, active = _fetch((tokens, logprobs, self.slots.active))
        for slot, sample in enumerate(self.owner):
            if sample is None:
                continue
            sampled = tokens[slot] >= 0
            self._append(
                slot, tokens[slot][sampled].tolist(), logprobs[slot][sampled].tolist(),
                finished=not active[slot],
            )  # fmt: skip

    def _append(self, slot: int, ids: list[int], logprobs: list[float], finished: bool) -> None:
        sample = self.owner[slot]
        ticket, out, lps = sample.ticket, sample.ids, sample.logprobs
        checked = len(out)
        out.extend(ids)
        lps.extend(logprobs)
        reason = "stop" if out and out[-1] in self.stop_set else "length"
        text = None
        tokenizer = self.engine.tokenizer
        if tokenizer is not None and ticket.sampling.stop:
            text, cut = find_stop(self._text, ticket.sampling.stop, out, checked)
            if cut is not None:
                del out[cut:], lps[cut:]
                finished, reason = True, "stop"
        completion = None
        if finished:
            if text is None and tokenizer is not None:
                text = self._text(out)
            completion = Completion(sample.prompt, sample.index, out, lps, reason, text)
            self.owner[slot] = None
        if ticket.listener is not None:
            ticket.listener(sample.prompt, sample.index, out[checked:], completion)
        if completion is not None:
            ticket.finish((sample.prompt, sample.index), completion)

    def _text(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)
