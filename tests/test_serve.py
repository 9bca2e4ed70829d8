"""`python -m infir2_jax.serve` through a real OpenAI client: chat and completions against
`transformers` greedy output, `n`, seeds, stops, `max_tokens`, logprobs, batching of concurrent
requests, and every error case as OpenAI-style JSON."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests
import torch
import uvicorn
from conftest import free_port, make_qwen_model
from transformers import AutoTokenizer

from infir2_jax.serve.__main__ import build, parse_args, served_name

NAME = "tiny-qwen"
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny random model with Qwen2.5's vocabulary, the real Qwen tokenizer beside it."""
    return make_qwen_model(tmp_path_factory.mktemp("served"), qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    yield from _serve(
        model_dir, "--batch-size", "16", "--max-len", "64", "--api-key", KEY,
        "--max-samples-per-request", "64", "--max-body-bytes", "65536",
    )  # fmt: skip


@pytest.fixture(scope="module")
def long_server(model_dir):
    """Room for long answers (512 tokens), small decode chunks."""
    yield from _serve(
        model_dir, "--batch-size", "8", "--max-len", "512", "--steps-per-call", "8",
        "--api-key", KEY,
    )  # fmt: skip


def _serve(model_dir, *options):
    port = free_port()
    args = parse_args(
        ["--model", str(model_dir), "--served-model-name", NAME, "--chat-template", "qwen2.5",
         "--set", "model.dtype=float32", *options]
    )  # fmt: skip
    app, scheduler = build(args)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    httpd = uvicorn.Server(config)
    thread = threading.Thread(target=httpd.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    yield client, url, scheduler
    httpd.should_exit = True
    thread.join(timeout=10)
    scheduler.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def _hf_greedy(reference, ids, new_tokens):
    model, _ = reference
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_models_and_health(server):
    client, url, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    assert requests.get(f"{url}/health").status_code == 200


def test_greedy_completion_equals_transformers(server, reference):
    client, _, _ = server
    _, tokenizer = reference
    prompt = "The answer is"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=1
    )
    expected = _hf_greedy(reference, ids, 10)
    (choice,) = r.choices
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    assert choice.finish_reason == "length"
    # logprobs: log-softmax of the full forward at each sampled token (temperature 0: T = 1)
    model, _ = reference
    with torch.no_grad():
        logits = model(torch.tensor([ids + expected])).logits[0, len(ids) - 1 : -1]
    want = torch.log_softmax(logits.double(), -1)[torch.arange(10), torch.tensor(expected)]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, want.numpy(), atol=1e-4)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in expected]


def test_chat_greedy_equals_transformers_on_the_qwen25_template(server, reference):
    client, _, _ = server
    _, tokenizer = reference
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    from infir2_jax.data.tokenizer import load_tokenizer

    templated = load_tokenizer(str(tokenizer.name_or_path), "qwen2.5")
    text = templated.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system\nYou are Qwen" in text  # Qwen2.5's default system turn
    ids = templated(text, add_special_tokens=False)["input_ids"]
    expected = _hf_greedy(reference, ids, 8)
    assert r.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)


def test_n_seed_stop_and_max_tokens(server):
    client, _, _ = server
    kwargs = dict(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3)
    a = client.completions.create(seed=7, **kwargs)
    b = client.completions.create(seed=7, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed decides
    assert len({c.text for c in a.choices}) > 1  # three different samples
    assert a.usage.completion_tokens <= 36
    stop = a.choices[0].text[3:5]
    if stop:
        c = client.completions.create(seed=7, stop=[stop], **kwargs)
        assert stop not in c.choices[0].text and c.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3,
        temperature=1.0, seed=1, n=2, logprobs=True,
    )  # fmt: skip
    for choice in chat.choices:
        assert choice.finish_reason in ("length", "stop")
        assert 1 <= len(choice.logprobs.content) <= 3
        assert all(t.logprob <= 0 for t in choice.logprobs.content)


def test_concurrent_requests_share_the_engine_slots(server):
    client, _, scheduler = server
    before = len(scheduler.batches)

    def ask(i):
        return client.completions.create(
            model=NAME, prompt=f"Request {i}:", max_tokens=40, temperature=1.0, seed=i,
            top_p=0.9 if i % 2 else 1.0,
        )  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert max(scheduler.batches[before:]) >= 2  # requests decoded together, each its settings
    alone = ask(3)  # a seeded request's samples do not depend on its batch
    assert alone.choices[0].text == answers[3].choices[0].text


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
        ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": NAME, "prompt": "x", "stream": True, "logprobs": 1}, 400, "logprobs"),
        ({"model": NAME, "prompt": "x", "logprobs": 5}, 400, "logprobs"),
        ({"model": NAME, "prompt": ""}, 400, "prompt"),
        ({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": NAME, "prompt": list(range(70))}, 400, "prompt"),  # > --max-len 64
        ({"model": NAME, "prompt": [1, 2], "max_tokens": 63}, 400, "max_tokens"),  # 65 > 64
        ({"model": NAME, "prompt": "x", "seed": -1}, 400, "seed"),
        ({"model": NAME, "prompt": "x", "seed": 2**64}, 400, "seed"),
        ({"model": NAME, "prompt": "x", "seed": "7"}, 400, "seed"),
        ({"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "x", "top_p": [1]}, 400, "top_p"),
        ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": NAME, "prompt": 5}, 400, "prompt"),
        (b'{"model": "tiny-qwen", "prompt": "a\\ud800b"}', 400, "prompt"),  # lone surrogate
        ({"model": NAME, "prompt": ["hi"] * 2000, "n": 128}, 400, "n"),  # > 64 samples
        ({"model": NAME, "prompt": ["hi"] * 33, "n": 2}, 400, "n"),
    ],
)
def test_errors_are_openai_json(server, body, status, param):
    _, url, _ = server
    if isinstance(body, bytes):
        r = requests.post(f"{url}/v1/completions", data=body, headers=AUTH)
    else:
        r = requests.post(f"{url}/v1/completions", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    if param in ("prompt", "max_tokens") and "context length" in error["message"]:
        assert error["code"] == "context_length_exceeded"
    if param == "n" and "samples" in error["message"]:
        assert "64" in error["message"] and "--max-samples-per-request" in error["message"]


def test_lone_surrogate_in_a_chat_is_a_400(server):
    _, url, _ = server
    body = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    r = requests.post(f"{url}/v1/chat/completions", data=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_api_key(server):
    _, url, _ = server
    body = {"model": NAME, "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = requests.post(f"{url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{url}/v1/models").status_code == 401
    assert requests.get(f"{url}/health").status_code == 200  # open without a key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()


def test_served_model_name_is_never_the_path(model_dir):
    args = parse_args(["--model", str(model_dir)])
    assert served_name(args) == model_dir.name and "/" not in served_name(args)


def test_max_tokens_defaults_to_the_room_left(server):
    client, _, _ = server
    r = client.completions.create(model=NAME, prompt=[1, 2, 3], temperature=0)
    assert r.usage.total_tokens <= 64
    assert r.choices[0].finish_reason == "stop" or r.usage.total_tokens == 64


def test_body_limit_and_health_during_a_slow_body(server):
    _, url, _ = server
    big = b'{"prompt": "' + b"x" * (20 << 20) + b'"}'
    r = requests.post(f"{url}/v1/completions", data=big, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

    def slow():  # a body that trickles in for ~2 s (under the limit)
        for _ in range(20):
            time.sleep(0.1)
            yield b" " * 1000

    def send():
        return requests.post(f"{url}/v1/completions", data=slow(), headers=AUTH, timeout=30)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(send)
        time.sleep(0.3)
        t0 = time.perf_counter()
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 1.0
        assert pending.result().status_code == 400  # whitespace is not a JSON object


def test_errors_through_the_client(server):
    client, _, _ = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "word " * 80}]
        )
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "x"}])


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_long_request_does_not_delay_a_short_one(long_server):
    client, _, scheduler = long_server
    short = dict(model=NAME, prompt="Hi", max_tokens=2, temperature=0)
    client.completions.create(**short)  # compiled
    t0 = time.perf_counter()
    client.completions.create(**short)
    alone = time.perf_counter() - t0
    long = dict(model=NAME, prompt="Tell a story", max_tokens=480, temperature=0, n=4)
    with ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        pending = pool.submit(client.completions.create, **long)
        assert _wait(lambda: scheduler.busy_slots() == 4, 30)
        t0 = time.perf_counter()
        answer = client.completions.create(**short)
        crowded = time.perf_counter() - t0
        assert not pending.done()  # the short one finished while the long one runs
        assert answer.usage.completion_tokens == 2
        assert pending.result(timeout=300).usage.completion_tokens > 4 * 100
        whole = time.perf_counter() - start
    # 480 decode steps in chunks of 8: the short one waits for a chunk or two, not for 60
    assert crowded < whole / 6, (alone, crowded, whole)
    assert _wait(scheduler.idle, 5)


def test_a_disconnected_client_is_cancelled(long_server):
    client, url, scheduler = long_server
    client.completions.create(model=NAME, prompt="Warm up", max_tokens=9, n=4)  # compiled
    before = scheduler.cancelled
    body = {"model": NAME, "prompt": "Tell a long story", "max_tokens": 480, "n": 4}
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and leaves
        requests.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=1.0)
    assert _wait(scheduler.idle, 5)  # its slots were freed long before 480 tokens
    assert scheduler.cancelled - before == 4
    assert max(scheduler.batches[-3:]) == 1  # it had reached the slots (it was decoding)


def test_per_row_sampling_depends_only_on_the_row():
    import jax

    from infir2_jax.generate.sampling import PerRow, RowFilters, SamplingParams, sample_rows

    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 3
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    plain = SamplingParams(temperature=0.8).token_filter()
    greedy = SamplingParams(temperature=0).token_filter()
    topk1 = SamplingParams(temperature=1.0, top_k=1).token_filter()
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1).token_filter()
    a, _ = sample_rows(logits, keys, RowFilters.of([plain, greedy, topk1, nucleus]), PerRow(True))
    b, _ = sample_rows(logits, keys, RowFilters.of([plain] * 4), PerRow(False))
    assert int(a[0]) == int(b[0])  # a row's draw does not depend on its neighbours
    argmax = np.argmax(np.asarray(logits), -1)
    assert int(a[1]) == argmax[1] and int(a[2]) == argmax[2]
    probs = np.exp(np.asarray(logits[3]) - np.asarray(logits[3]).max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus_ids = order[: np.searchsorted(np.cumsum(probs[order]), 0.5) + 1]
    assert int(a[3]) in nucleus_ids


def test_streaming_equals_the_whole_answer(server):
    client, _, _ = server
    kwargs = dict(model=NAME, prompt=["Once upon a time", "The answer"], max_tokens=20, n=2)
    whole = client.completions.create(temperature=1.0, seed=3, **kwargs)
    stream = client.completions.create(
        temperature=1.0, seed=3, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_chat_streaming_with_a_stop_string(server):
    client, _, _ = server
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=24)
    whole = client.chat.completions.create(temperature=0, **kwargs)
    text = whole.choices[0].message.content
    stop = text[6:9] if len(text) > 9 and text[6:9].strip() else None
    if stop:
        whole = client.chat.completions.create(temperature=0, stop=[stop], **kwargs)
    stops = [stop] if stop else None
    chunks = list(client.chat.completions.create(temperature=0, stream=True, stop=stops, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.model == NAME for c in chunks)


def test_a_client_leaving_a_stream_is_cancelled(long_server):
    client, _, scheduler = long_server
    before = scheduler.cancelled
    stream = client.completions.create(
        model=NAME, prompt="A long story", max_tokens=480, n=2, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert _wait(scheduler.idle, 5)
    assert scheduler.cancelled - before == 2
