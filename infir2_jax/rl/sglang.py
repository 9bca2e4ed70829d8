"""Rollouts from SGLang servers over HTTP (`rl.rollout.engine: sglang`), InfiR2's set-up.

Weight sync, every step: the trainer writes its current weights as an HF checkpoint (BF16,
FP32, or block FP8 — the format of checkpoint/fp8_export.py that SGLang loads natively) to
`<run_dir>/rollout_weights/v<step>/`, then asks every server to load it with
`POST /update_weights_from_disk {"model_path", "weight_version"}` and checks the version the
server reports. Only the newest `keep_versions` directories are kept. The directory must be
on a filesystem the servers see (a shared one on a cluster).

Generation: the prompts are split into contiguous chunks, one per server, each sent as one
native `POST /generate` with `input_ids`, the sampling parameters, `n` and
`return_logprob`; SGLang answers with a flat, prompt-major list of `len(chunk) × n` outputs
whose `output_ids` and `meta_info.output_token_logprobs` include the stop token, the
log-probabilities being those of softmax(logits / temperature) — what our engine returns
and what the trainer recomputes. SGLang sampling is not seeded (`sampling_seed` needs a
deterministic-inference server and would make the `n` samples of a prompt identical), so a
resumed run does not repeat the same samples.

Contract checked against SGLang 0.5.15–0.5.23 (`sglang/srt/entrypoints/http_server.py`,
`managers/io_struct.py`); `/get_weight_version` (404 in most 0.5.x releases) falls back to
`/model_info` or `/get_model_info`, whose `weight_version` is the same field.
"""

from __future__ import annotations

import pickle
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import requests
from flax import traverse_util

from infir2_jax.checkpoint.fp8_export import export_fp8
from infir2_jax.checkpoint.hf_io import write_hf_checkpoint
from infir2_jax.config import RolloutConfig
from infir2_jax.generate import Completion, SamplingParams
from infir2_jax.model import ModelConfig
from infir2_jax.train.state import Params


class RolloutServerError(RuntimeError):
    """A rollout server is down, answered with an error, or did not load the weights."""


class SGLangRollout:
    def __init__(
        self,
        cfg: RolloutConfig,
        model: ModelConfig,
        weights_dir: Path,
        *,
        tokenizer_dir: str | None = None,
        max_len: int | None = None,
    ):
        self.cfg, self.model = cfg, model
        self.urls = [u.rstrip("/") for u in cfg.sglang_urls]
        self.weights_dir = Path(weights_dir).resolve()  # servers resolve paths in their cwd
        has_tokenizer = tokenizer_dir is not None and Path(tokenizer_dir).is_dir()
        self.tokenizer_dir = tokenizer_dir if has_tokenizer else None
        self.max_len = max_len
        self.version: int | None = None
        self.session = requests.Session()
        self.pool = ThreadPoolExecutor(max_workers=len(self.urls))
        if jax.process_index() == 0:  # only the first process talks to the servers
            for url in self.urls:
                self._request("GET", url, "/health", timeout=min(cfg.timeout, 60.0))

    # ----------------------------------------------------------------- HTTP
    def _request(
        self, method: str, url: str, path: str, payload: Any = None, *, timeout: float | None = None
    ) -> requests.Response:
        """One call with retries on connection errors and 5xx answers; a 4xx answer or the
        last failure raises RolloutServerError naming the server and what it said."""
        timeout = timeout or self.cfg.timeout
        error = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt, 30.0))
            try:
                response = self.session.request(method, url + path, json=payload, timeout=timeout)
            except requests.RequestException as e:
                error = f"{type(e).__name__}: {e}"
                continue
            if response.status_code < 500:
                return response
            error = f"HTTP {response.status_code}: {response.text[:500]}"
        raise RolloutServerError(
            f"SGLang server {url}{path} failed after {self.cfg.retries + 1} attempt(s): {error}. "
            "Is it running (rl.rollout.sglang_urls; launch/rl_sglang.sbatch starts them)?"
        )

    def _json(self, url: str, path: str, payload: Any = None) -> Any:
        response = self._request("GET" if payload is None else "POST", url, path, payload)
        if response.status_code != 200:
            raise RolloutServerError(
                f"SGLang server {url}{path}: HTTP {response.status_code}: {response.text[:500]}"
            )
        return response.json()

    # ----------------------------------------------------------------- weights
    def sync(self, params: Params, version: int) -> None:
        if version == self.version:
            return
        host = _gathered(params)  # every process takes part; the first one talks to servers
        if jax.process_index() == 0:
            self._load(self.export(host, version), version)
        _from_first_process(None)  # the others wait until the servers have the weights
        self.version = version

    def _load(self, path: Path, version: int) -> None:
        tag = f"v{version}"
        for url in self.urls:
            answer = self._request(
                "POST", url, "/update_weights_from_disk",
                {"model_path": str(path), "weight_version": tag, "flush_cache": True},
            )  # fmt: skip
            body = _maybe_json(answer)
            if answer.status_code != 200 or not body.get("success", False):
                raise RolloutServerError(
                    f"SGLang server {url} did not load {path}: "
                    f"{body.get('message') or answer.text[:500]}"
                )
            reported = self.weight_version(url)
            if reported != tag:
                raise RolloutServerError(
                    f"SGLang server {url} reports weight version {reported!r} after loading "
                    f"{tag!r} from {path}"
                )
        self._prune()

    def weight_version(self, url: str) -> str | None:
        for path in ("/get_weight_version", "/model_info", "/get_model_info"):
            response = self._request("GET", url, path)
            if response.status_code == 200:
                return _maybe_json(response).get("weight_version")
        raise RolloutServerError(f"SGLang server {url}: no endpoint reports the weight version")

    def export(self, params: Params, version: int) -> Path:
        """Host weights as an HF directory `v<version>` (replacing one a resumed run left)."""
        out = self.weights_dir / f"v{version}"
        if out.exists():
            shutil.rmtree(out)
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        host = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
        fmt = self.cfg.weights
        if fmt == "fp8_block":
            staging = self.weights_dir / f".v{version}-bf16"
            if staging.exists():
                shutil.rmtree(staging)
            write_hf_checkpoint(
                host, self.model, staging, dtype="bfloat16", copy_files_from=self.tokenizer_dir
            )
            try:
                export_fp8(staging, out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            dtype = "float32" if fmt == "fp32" else "bfloat16"
            write_hf_checkpoint(
                host, self.model, out, dtype=dtype, copy_files_from=self.tokenizer_dir
            )
        return out

    def _prune(self) -> None:
        versions = sorted(
            (int(p.name[1:]), p)
            for p in self.weights_dir.glob("v*")
            if p.is_dir() and p.name[1:].isdigit()
        )
        for _, path in versions[: -self.cfg.keep_versions]:
            shutil.rmtree(path, ignore_errors=True)

    # ----------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        results = None
        if jax.process_index() == 0:
            results = self._generate(prompts, sampling)
        return _from_first_process(results)

    def _generate(self, prompts, sampling: SamplingParams) -> list[list[Completion]]:
        chunks = np.array_split(np.arange(len(prompts)), min(len(self.urls), len(prompts)))
        jobs = [
            self.pool.submit(
                self._generate_chunk,
                self.urls[i],
                [prompts[j] for j in chunk],
                sampling,
                int(chunk[0]),
            )  # fmt: skip
            for i, chunk in enumerate(chunks)
        ]
        return [per for job in jobs for per in job.result()]

    def _generate_chunk(
        self, url: str, prompts: list, sampling: SamplingParams, first_index: int
    ) -> list[list[Completion]]:
        n = sampling.n
        payload = {
            "input_ids": [list(map(int, p)) for p in prompts],
            "sampling_params": _sampling_params(sampling, self.max_len, prompts),
            "return_logprob": True,
        }
        outputs = self._json(url, "/generate", payload)
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != len(prompts) * n:
            raise RolloutServerError(
                f"SGLang server {url}/generate: {len(outputs)} outputs for {len(prompts)} "
                f"prompts × n={n}"
            )
        results = []
        for p in range(len(prompts)):
            per = []
            for s in range(n):
                per.append(_completion(outputs[p * n + s], first_index + p, s, url))
            results.append(per)
        return results

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.session.close()


def _sampling_params(sampling: SamplingParams, max_len: int | None, prompts) -> dict[str, Any]:
    max_new = sampling.max_new_tokens
    if max_len is not None:  # the same budget the JAX engine's cache allows
        max_new = max(1, min(max_new, max_len - max(len(p) for p in prompts)))
    params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k or -1,
        "min_p": sampling.min_p,
        "max_new_tokens": max_new,
        "n": sampling.n,
        "skip_special_tokens": True,
        "no_stop_trim": True,
    }
    if sampling.stop_token_ids is not None:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    return params


def _completion(output: dict, index: int, sample: int, url: str) -> Completion:
    meta = output.get("meta_info") or {}
    pairs = meta.get("output_token_logprobs")
    ids = [int(t) for t in output.get("output_ids") or []]
    if pairs is None or len(pairs) != len(ids):
        raise RolloutServerError(
            f"SGLang server {url}/generate: output {index}/{sample} has "
            f"{len(ids)} ids and {None if pairs is None else len(pairs)} logprobs "
            "(return_logprob must be honoured)"
        )
    if any(int(p[1]) != t for p, t in zip(pairs, ids, strict=True)):
        raise RolloutServerError(f"SGLang server {url}: logprobs do not match output_ids")
    finish = (meta.get("finish_reason") or {}).get("type", "length")
    if finish == "abort":
        raise RolloutServerError(
            f"SGLang server {url}: request aborted: {meta['finish_reason'].get('message')}"
        )
    reason = "stop" if finish == "stop" else "length"
    return Completion(index, sample, ids, [float(p[0]) for p in pairs], reason, output.get("text"))


def _maybe_json(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _gathered(params: Params) -> Params:
    """The parameters whole on this host (from shards on any number of processes)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def _from_first_process(value: Any) -> Any:
    """`value` of process 0 on every process (a barrier too); itself with one process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(value), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array([data.size], np.int64))[0])
    buffer = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buffer[:] = data
    return pickle.loads(multihost_utils.broadcast_one_to_all(buffer).tobytes())
