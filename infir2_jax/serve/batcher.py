"""Many HTTP requests, one generation engine: requests wait in a queue; a worker thread takes
the first, waits `window` seconds for more, and runs the waiting requests that share sampling
parameters as one `Engine.generate` call (the engine batches their samples in its slots).

Each request's random draws depend only on its own seed and prompt index (the engine's
`key_indices`), never on which requests it was batched with: a seeded request returns the
same samples alone or in a crowd.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from infir2_jax.generate import Completion, Engine, SamplingParams


@dataclasses.dataclass
class _Request:
    prompts: list[list[int]]
    sampling: SamplingParams  # seed 0: the request's seed lives in `keys`
    keys: list[int]
    future: Future


def request_keys(seed: int | None, count: int) -> list[int]:
    """Key indices for a request's prompts: from its seed, or fresh random ones."""
    rng = np.random.default_rng(None if seed is None else [seed, 0x5EED])
    return [int(k) for k in rng.integers(0, 2**31, count)]


class Batcher:
    def __init__(self, engine: Engine, window: float = 0.01):
        self.engine, self.window = engine, window
        self.queue: queue.Queue[_Request | None] = queue.Queue()
        self.batches: list[int] = []  # requests per engine call (what the tests look at)
        self.thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self.thread.start()

    def submit(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, seed: int | None
    ) -> Future:
        """A future of `sampling.n` completions per prompt."""
        future: Future = Future()
        sampling = dataclasses.replace(sampling, seed=0)
        self.queue.put(
            _Request([list(p) for p in prompts], sampling, request_keys(seed, len(prompts)), future)
        )
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            waiting = [first]
            deadline = time.monotonic() + self.window
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # stop after this batch
                    break
                waiting.append(item)
            groups: dict[SamplingParams, list[_Request]] = {}
            for request in waiting:
                groups.setdefault(request.sampling, []).append(request)
            for sampling, requests in groups.items():
                self._run(sampling, requests)

    def _run(self, sampling: SamplingParams, requests: list[_Request]) -> None:
        prompts = [p for r in requests for p in r.prompts]
        keys = [k for r in requests for k in r.keys]
        self.batches.append(len(requests))
        try:
            results: list[list[Completion]] = self.engine.generate(
                prompts, sampling, key_indices=keys
            )
        except Exception as e:  # noqa: BLE001 - every waiting request learns why
            for r in requests:
                r.future.set_exception(e)
            return
        start = 0
        for r in requests:
            r.future.set_result(results[start : start + len(r.prompts)])
            start += len(r.prompts)
