"""`stream: true`: server-sent events in OpenAI's chunk format (`data: {...}\\n\\n` per chunk,
then `data: [DONE]\\n\\n`). The scheduler reports each sample's new tokens after every decode
chunk; the text sent is the decoded text so far, minus what was already sent. Text that may
still change is held back: an incomplete UTF-8 character (`\\ufffd` at the end), and, when the
request has stop strings, as many characters as the longest stop string could still cover
(the final text is cut before the stop string, as without streaming). A client that leaves
mid-stream has its request cancelled."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from infir2_jax.generate import Completion, SamplingParams
from infir2_jax.serve.scheduler import Scheduler

POLL = 0.1  # seconds between checks that the client is still there


def stream_response(
    scheduler: Scheduler, request: Request, prompts, sampling: SamplingParams, seed,
    *, chat: bool, model_name: str, tokenizer, include_usage: bool,
) -> StreamingResponse:  # fmt: skip
    """Submits the request now; its chunks stream as the scheduler produces them."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def listener(prompt: int, sample: int, ids: list[int], done: Completion | None) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (prompt, sample, ids, done))

    ticket = scheduler.submit(prompts, sampling, seed, listener)
    ticket.future.add_done_callback(
        lambda f: f.cancelled() or f.exception() is None or loop.call_soon_threadsafe(
            events.put_nowait, f.exception()
        )
    )  # fmt: skip
    chunk = _Chunks(chat, model_name)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    holdback = max((len(s) for s in sampling.stop), default=1) - 1

    async def body() -> AsyncIterator[str]:
        total, finished = len(prompts) * sampling.n, 0
        ids: dict[tuple[int, int], list[int]] = {}
        sent: dict[tuple[int, int], str] = {}
        tokens = 0
        try:
            if chat:
                for s in range(sampling.n):
                    yield chunk.data(s, {"role": "assistant", "content": ""}, None)
            while finished < total:
                event = await _next(events, request)
                if event is None:
                    return  # the client left: `finally` cancels the work
                if isinstance(event, BaseException):
                    yield _error(event)
                    return
                prompt, sample, new, done = event
                key, index = (prompt, sample), prompt * sampling.n + sample
                ids.setdefault(key, []).extend(new)
                old = sent.get(key, "")
                text = _safe_text(decode(ids[key]), holdback) if done is None else done.text
                delta = text[len(old) :] if text.startswith(old) else ""
                sent[key] = old + delta
                if done is not None:
                    finished += 1
                    tokens += len(done.output_ids)
                if delta or done is not None:
                    reason = None if done is None else done.finish_reason
                    yield chunk.data(index, {"content": delta} if chat else delta, reason)
            if include_usage:
                yield chunk.usage(sum(len(p) for p in prompts), tokens)
            yield "data: [DONE]\n\n"
        finally:
            if finished < total:
                scheduler.cancel(ticket)

    return StreamingResponse(body(), media_type="text/event-stream")


async def _next(events: asyncio.Queue, request: Request):
    """The next event, or None once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL)
        except TimeoutError:
            if await request.is_disconnected():
                return None


def _safe_text(text: str, holdback: int) -> str:
    """The part of a partial answer that will not change as more tokens come."""
    text = text.rstrip("\ufffd")
    return text[: len(text) - holdback] if holdback else text


def _error(error: BaseException) -> str:
    body = {"message": f"{type(error).__name__}: {error}", "type": "server_error"}
    return f"data: {json.dumps({'error': body})}\n\n"


class _Chunks:
    def __init__(self, chat: bool, model_name: str):
        self.chat, self.model = chat, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _frame(self, choices: list, **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body: dict[str, Any] = {
            "id": self.id, "object": obj, "created": self.created, "model": self.model,
            "choices": choices, **extra,
        }  # fmt: skip
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def data(self, index: int, delta, finish_reason: str | None) -> str:
        choice = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        choice["delta" if self.chat else "text"] = delta
        return self._frame([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        usage = {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }  # fmt: skip
        return self._frame([], usage=usage)
