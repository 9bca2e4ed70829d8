"""The OpenAI-compatible API over the batcher: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`.

Request fields: `model`, `n`, `temperature` (0: greedy), `top_p`, `top_k` (extension; 0 or -1:
off), `min_p` (extension), `max_tokens` (`max_completion_tokens` for chat), `stop` (a string
or up to 4), `seed`, and `logprobs` (chat: true/false with `top_logprobs` 0; completions: 0 or
1) — the log-probability of each sampled token under softmax(logits / temperature); this
engine does not return alternatives, so a request for more top log-probabilities is refused
rather than answered partly; `stream` (server-sent events, serve/streaming.py, with
`stream_options.include_usage`; not with logprobs). Not supported (400): `echo`, `best_of`
> n, penalties, `logit_bias`, tools. Errors are OpenAI's JSON (`{"error": {"message", "type",
"param", "code"}}`): 400 for bad JSON or an invalid field, 404 for an unknown model, 400
`context_length_exceeded` for a prompt the KV cache cannot hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from infir2_jax.data import DataError
from infir2_jax.generate import Completion, SamplingParams
from infir2_jax.generate.prompts import chat_prompt_ids
from infir2_jax.serve.limits import Limits
from infir2_jax.serve.scheduler import Scheduler
from infir2_jax.serve.streaming import stream_response

MAX_STOPS = 4
MAX_N = 128
MAX_SEED = 2**63 - 1
DISCONNECT_POLL = 0.1  # seconds between checks that a waiting client is still there
UNSUPPORTED = ("logit_bias", "tools", "functions", "suffix", "response_format")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def create_app(
    scheduler: Scheduler, *, model_name: str, tokenizer, limits: Limits | None = None,
    api_key: str | None = None,
) -> FastAPI:  # fmt: skip
    """The HTTP app; `tokenizer` renders chats, encodes text prompts and decodes outputs;
    `api_key`: every `/v1` request needs `Authorization: Bearer <key>` (`/health` is open)."""
    engine = scheduler.engine
    limits = limits or Limits()
    app = FastAPI(title="infir2-jax", docs_url=None, redoc_url=None)
    created = int(time.time())

    def authorize(request: Request) -> None:
        # A check in each route, not an HTTP middleware: Starlette's BaseHTTPMiddleware
        # wraps `receive`, and a route behind it no longer sees its client disconnect.
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key (Authorization: Bearer <key>)",
                           None, "invalid_api_key")  # fmt: skip

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return APIError(500, f"{type(error).__name__}: {error}").response()

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "infir2-jax"}
        return {"object": "list", "data": [model]}

    served = _Served(scheduler, engine, tokenizer, model_name, limits)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await _completions(served, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        return await _chat(served, request)

    return app


@dataclasses.dataclass(frozen=True)
class _Served:
    scheduler: Scheduler
    engine: Any
    tokenizer: Any
    model_name: str
    limits: Limits

    def stream(self, request, prompts, sampling, seed, body, *, chat: bool):
        return stream_response(
            self.scheduler, request, prompts, sampling, seed, chat=chat,
            model_name=self.model_name, tokenizer=self.tokenizer,
            include_usage=_include_usage(body),
        )  # fmt: skip


async def _completions(served: _Served, request: Request):
    engine, tokenizer = served.engine, served.tokenizer
    body = await _body(request, served.model_name, served.limits.max_body)
    if body.get("echo"):
        raise _bad("echo is not supported", "echo")
    logprobs = _int(body, "logprobs", None, 0, 1)
    n = _int(body, "n", 1, 1, MAX_N)
    _check_count(_prompt_count(body.get("prompt")) * n, served.limits.max_samples)
    prompts = await asyncio.to_thread(_completion_prompts, body.get("prompt"), tokenizer)
    _check_lengths(prompts, engine, "prompt")
    sampling, seed = _sampling(body, "max_tokens", prompts, engine.max_len)
    if _streaming(body, logprobs):
        return served.stream(request, prompts, sampling, seed, body, chat=False)
    per_prompt = await _generate(served.scheduler, request, prompts, sampling, seed)
    choices = []
    for i, per in enumerate(per_prompt):
        for c in per:
            choice = {
                "index": i * sampling.n + c.sample,
                "text": c.text or "",
                "logprobs": _completion_logprobs(c, tokenizer) if logprobs else None,
                "finish_reason": c.finish_reason,
            }
            choices.append(choice)
    return _response("text_completion", "cmpl", served.model_name, choices, prompts, per_prompt)


async def _chat(served: _Served, request: Request):
    engine, tokenizer = served.engine, served.tokenizer
    body = await _body(request, served.model_name, served.limits.max_body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content}", "messages")
    if _int(body, "top_logprobs", 0, 0, None):
        raise _bad("top_logprobs > 0 is not supported (logprobs: true gives the sampled "
                   "tokens' log-probabilities)", "top_logprobs")  # fmt: skip
    logprobs = _bool(body, "logprobs")
    _check_count(_int(body, "n", 1, 1, MAX_N), served.limits.max_samples)
    prompts = [await asyncio.to_thread(_chat_ids, messages, tokenizer)]
    _check_lengths(prompts, engine, "messages")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    sampling, seed = _sampling(body, key, prompts, engine.max_len)
    if _streaming(body, logprobs):
        return served.stream(request, prompts, sampling, seed, body, chat=True)
    (per,) = await _generate(served.scheduler, request, prompts, sampling, seed)
    choices = [
        {
            "index": c.sample,
            "message": {"role": "assistant", "content": c.text or ""},
            "logprobs": {"content": _chat_logprobs(c, tokenizer)} if logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in per
    ]
    return _response("chat.completion", "chatcmpl", served.model_name, choices, prompts, [per])


async def _read(request: Request, max_body: int) -> bytes:
    """The body, refused (413) as soon as it passes `max_body` bytes."""

    def too_large() -> APIError:
        return APIError(413, f"the request body exceeds the server's limit of {max_body} bytes "
                        "(--max-body-bytes)", None, "request_too_large")  # fmt: skip

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for name, value in body.items():
        if not _encodable(value):
            raise _bad(f"{name} contains text that is not valid Unicode (a lone surrogate)", name)
    return body


def _encodable(value) -> bool:
    """No lone surrogates (`"\\ud800"` parses as JSON but no tokenizer can encode it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    return True


async def _body(request: Request, model_name: str, max_body: int) -> dict[str, Any]:
    body = await asyncio.to_thread(_parse, await _read(request, max_body))
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model `{model}` does not exist (this server has "
                            f"`{model_name}`)", "model", "model_not_found")  # fmt: skip
    for name in UNSUPPORTED:
        if body.get(name):
            raise _bad(f"{name} is not supported", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise _bad(f"{name} is not supported", name)
    if body.get("best_of") not in (None, body.get("n", 1)):
        raise _bad("best_of is not supported", "best_of")
    return body


def _streaming(body: dict, logprobs) -> bool:
    stream = _bool(body, "stream")
    if stream and logprobs:
        raise _bad("logprobs are not streamed (ask without stream)", "logprobs")
    return stream


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return _bool(options, "include_usage")


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(f"{name} must be a number in [{low}, {high}], got {value!r}", name)
    return float(value)


def _int(body: dict, name: str, default: int | None, low: int, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(f"{name} must be an integer >= {low}, got {value!r}", name)
    if high is not None and value > high:
        raise _bad(f"{name} must be at most {high}, got {value}", name)
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false, got {value!r}", name)
    return value


def _stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOPS
    ):
        raise _bad(f"stop must be a non-empty string or a list of up to {MAX_STOPS}", "stop")
    return tuple(stops)


def _sampling(body: dict, max_key: str, prompts, max_len: int) -> tuple[SamplingParams, Any]:
    """(sampling parameters, the request's seed or None). `max_tokens` defaults to the room
    the longest prompt leaves in the context; prompt + max_tokens beyond it is refused."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < 1e-3:
        temperature = 0.0  # a near-zero temperature is greedy
    top_k = _int(body, "top_k", 0, -1, None)
    longest = max(len(p) for p in prompts)
    max_tokens = _int(body, max_key, max_len - longest, 1, None)
    if longest + max_tokens > max_len:
        raise _bad(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or {max_key}.",
            max_key,
            "context_length_exceeded",
        )
    seed = _int(body, "seed", None, 0, MAX_SEED)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")
    sampling = SamplingParams(
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        top_k=max(top_k, 0),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        max_new_tokens=max_tokens,
        n=_int(body, "n", 1, 1, MAX_N),
        stop=_stops(body.get("stop")),
    )
    return sampling, seed


def _check_count(samples: int, max_samples: int) -> None:
    if samples > max_samples:
        raise _bad(
            f"the request asks for {samples} samples (prompts × n); this server allows "
            f"{max_samples} per request (--max-samples-per-request)",
            "n",
        )


def _prompt_count(prompt) -> int:
    """Prompts in a completions `prompt` (checked before anything is tokenized)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1


def _chat_ids(messages, tokenizer) -> list[int]:
    try:
        return chat_prompt_ids(messages, tokenizer, "messages")
    except DataError as e:
        raise _bad(str(e), "messages") from None


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, token ids, a list of token ids."""

    def is_ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x
        )  # fmt: skip

    if isinstance(prompt, str):
        prompts = [prompt]
    elif is_ids(prompt):
        return [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return prompt
    else:
        raise _bad("prompt must be a string, a list of strings, or token ids", "prompt")
    if any(not p for p in prompts):
        raise _bad("prompt must not be empty", "prompt")
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _check_lengths(prompts: list[list[int]], engine, param: str) -> None:
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < engine.cfg.vocab_size]
        if bad:
            raise _bad(f"token id {bad[0]} is outside the vocabulary", param)
        if len(ids) >= engine.max_len:
            raise _bad(
                f"This model's maximum context length is {engine.max_len} tokens; the prompt "
                f"has {len(ids)} (and needs room for at least one new token)",
                param,
                "context_length_exceeded",
            )


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its work was cancelled)."""


async def _generate(scheduler, request, prompts, sampling, seed) -> list[list[Completion]]:
    """The request's completions; polls for a disconnect meanwhile and cancels the
    request's work (its waiting samples and slots) when the client has gone."""
    ticket = scheduler.submit(prompts, sampling, seed)
    future = asyncio.wrap_future(ticket.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL)
            if done:
                return future.result()
            if await request.is_disconnected():
                raise ClientGone()
    except BaseException:  # a disconnect, or the server task cancelled
        scheduler.cancel(ticket)
        raise


def _response(obj, prefix, model_name, choices, prompts, per_prompt) -> dict[str, Any]:
    completion_tokens = sum(len(c.output_ids) for per in per_prompt for c in per)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _token_strings(ids: list[int], tokenizer) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def _completion_logprobs(c: Completion, tokenizer) -> dict[str, Any]:
    ids, logprobs = _answer_tokens(c, tokenizer)
    tokens = _token_strings(ids, tokenizer)
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None,
            "text_offset": offsets}  # fmt: skip


def _chat_logprobs(c: Completion, tokenizer) -> list[dict[str, Any]]:
    ids, logprobs = _answer_tokens(c, tokenizer)
    return [
        {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
        for t, lp in zip(_token_strings(ids, tokenizer), logprobs, strict=True)
    ]


def _answer_tokens(c: Completion, tokenizer) -> tuple[list[int], list[float]]:
    """The sampled tokens that are part of the answer: a final special stop token (EOS,
    `<|im_end|>`) is not, as OpenAI's APIs leave stop sequences out."""
    ids, logprobs = list(c.output_ids), list(c.logprobs)
    if c.finish_reason == "stop" and ids and ids[-1] in tokenizer.all_special_ids:
        return ids[:-1], logprobs[:-1]
    return ids, logprobs
