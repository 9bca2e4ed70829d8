"""`python -m infir2_jax.eval` with the real evalscope: against our own server on a tiny model
(the `jax` engine: started, used and stopped by the command), and against a server at a URL
that answers some questions right — the report's scores must equal an independent grading
of the predictions evalscope wrote.

evalscope pins its own huggingface_hub/datasets versions, so it may live in its own
environment: INFIR2_EVALSCOPE_PYTHON names that interpreter (.ci/run makes one); default:
this one."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
import requests
import uvicorn
from conftest import EVALSCOPE_PYTHON, evalscope_missing, free_port, make_qwen_model
from fastapi import FastAPI, Request

from infir2_jax.data.bundled import bundled_path
from infir2_jax.eval.__main__ import main
from infir2_jax.grading import MathReward


@pytest.fixture(scope="module", autouse=True)
def evalscope_installed():
    """Skipped, with the reason, where evalscope is not installed; CI installs it and fails
    if it cannot be used."""
    message = evalscope_missing()
    if message is not None:
        if os.environ.get("CI") or "INFIR2_EVALSCOPE_PYTHON" in os.environ:
            pytest.fail(message)
        pytest.skip(message)


def _sets(run_dir, port, *extra):
    sets = [
        f"eval.run_dir={run_dir}", f"eval.port={port}", f"eval.evalscope_python={EVALSCOPE_PYTHON}"
    ]  # fmt: skip
    return [a for s in [*sets, *extra] for a in ("--set", s)]


def _independent_grade(run_dir, benchmark) -> tuple[float, int]:
    """Mean reward of evalscope's raw model outputs (predictions files, thinking not yet
    removed) under our grader, which takes the text after the last </think> itself."""
    grade, scores = MathReward(), []
    predictions = run_dir / "evalscope" / benchmark / "predictions" / "infir2"
    for path in predictions.glob(f"{benchmark}_*.jsonl"):
        for line in path.read_text().splitlines():
            p = json.loads(line)
            content = p["model_output"]["choices"][0]["message"]["content"]
            if not isinstance(content, str):  # evalscope split a <think> block out: put it back
                content = "".join(
                    f"<think>{c['reasoning']}</think>" if c["type"] == "reasoning" else c["text"]
                    for c in content
                )
            scores.append(grade(content, _gold(benchmark, p)))
    return sum(scores) / len(scores), len(scores)


def _gold(benchmark, prediction) -> str:
    question = next(m for m in prediction["messages"] if m["role"] == "user")["content"]
    for record in _records(benchmark):
        if _question(benchmark, record) in question:
            return _answer(benchmark, record)
    raise AssertionError(f"question not found: {question[:80]}")


def _records(benchmark):
    name = "gsm8k_test" if benchmark == "gsm8k" else "aime24"
    return [json.loads(x) for x in bundled_path(name).read_text().splitlines()]


def _question(benchmark, record) -> str:
    return record["question"] if benchmark == "gsm8k" else record["problem"]


def _answer(benchmark, record) -> str:
    if benchmark == "gsm8k":
        return record["answer"].split("####")[-1].strip().replace(",", "")
    return str(record["answer"])


def test_eval_tiny_against_our_server(tmp_path, qwen_tokenizer_dir):
    model = make_qwen_model(tmp_path / "model", qwen_tokenizer_dir)
    run_dir, port = tmp_path / "eval", free_port()
    args = ["--config", "eval_tiny", "--model", str(model), *_sets(run_dir, port)]
    assert main(args) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["gsm8k"]["samples"] == 4 and report["aime24"]["samples"] == 4  # 2 × 2
    assert report["aime24"]["repeats"] == 2
    for name, result in report.items():
        ours, count = _independent_grade(run_dir, name)
        assert count == result["samples"]
        assert result["score"] == pytest.approx(ours) == pytest.approx(result["regraded"])
    table = (run_dir / "report.md").read_text()
    assert "| gsm8k |" in table and "| aime24 |" in table
    assert "serving" in (run_dir / "server-jax.log").read_text()
    assert not _answers(f"http://127.0.0.1:{port}")  # stopped at the end


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=1).ok
    except requests.RequestException:
        return False


@pytest.fixture
def oracle():
    """An OpenAI-compatible server that reasons in a <think> block (holding a wrong boxed
    answer) and then boxes the right answer to every other question, a wrong one otherwise."""
    app = FastAPI()
    seen = []

    @app.get("/health")
    async def health():
        return {}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        question = body["messages"][-1]["content"]
        seen.append(body)
        answer = None
        for benchmark in ("gsm8k", "aime24"):
            for i, record in enumerate(_records(benchmark)):
                if _question(benchmark, record) in question:
                    right = _answer(benchmark, record)
                    answer = right if i % 2 == 0 else str(int(right) + 1)
        content = f"<think>Maybe \\boxed{{12345}}.</think>The answer is \\boxed{{{answer}}}."
        return {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not _answers(f"http://127.0.0.1:{port}"):
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_url_engine_scores_equal_an_independent_grading(tmp_path, oracle):
    url, seen = oracle
    run_dir = tmp_path / "eval"
    args = ["--config", "eval_tiny", "--engine", "url", "--url", url, *_sets(run_dir, 1)]
    assert main(args) == 0
    report = json.loads((run_dir / "report.json").read_text())
    # gsm8k: questions 0..3, right on 0 and 2; aime24: questions 0 and 1 twice, right on 0.
    assert report["gsm8k"]["score"] == pytest.approx(0.5)
    assert report["aime24"]["score"] == pytest.approx(0.5)
    # pass@k over 2 repeats: question 0 always right, question 1 never
    assert report["aime24"]["pass_at_k"] == {"1": pytest.approx(0.5), "2": pytest.approx(0.5)}
    for name, result in report.items():
        ours, count = _independent_grade(run_dir, name)
        assert (result["score"], result["samples"]) == (pytest.approx(ours), count)
        assert result["regraded"] == pytest.approx(ours)
    request = seen[0]
    assert request["messages"][0] == {
        "role": "system",
        "content": "Please reason step by step, and put your final answer within \\boxed{}.",
    }
    assert (request["temperature"], request["top_p"], request["max_tokens"]) == (0.65, 0.95, 24)
    table = (run_dir / "report.md").read_text()
    assert re.search(r"\| gsm8k \| \w+ \| 50.00 \| 50.00 \| – \| 4 \| 1 \|", table), table
    assert "| 50.00 (k=2) | 4 | 2 |" in table


def test_bundled_sets_in_a_benchmarks_layout(tmp_path):
    """`dataset: bundled:arithmetic` gives evalscope's gsm8k the bundled facts in GSM8K's
    layout (recipe_tiny's evaluation); a set not in the benchmark's layout is one error."""
    from infir2_jax.config import Benchmark, ConfigError
    from infir2_jax.eval.datasets import dataset_args

    args = dataset_args(Benchmark("gsm8k", dataset="bundled:arithmetic"), None, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert args["dataset_id"] == str(tmp_path / "gsm8k") and len(rows) == 81
    assert rows[6 * 9 + 7] == {"question": "What is 7 * 8?", "answer": "7 * 8 = 56\n#### 56"}
    with pytest.raises(ConfigError, match=r"aime24: dataset=bundled:arithmetic: no such"):
        dataset_args(Benchmark("aime24", dataset="bundled:arithmetic"), None, tmp_path)


def test_a_benchmarks_prompt_template_reaches_evalscope_and_is_checked(tmp_path):
    """`prompt_template` replaces the benchmark's user turn (recipe_tiny asks the bare question,
    as it trained); one that str.format cannot fill with the question is a config error."""
    from infir2_jax.config import Benchmark, ConfigError, load_eval_config
    from infir2_jax.eval.datasets import dataset_args
    from infir2_jax.recipe import load_recipe, plan

    assert "prompt_template" not in dataset_args(Benchmark("gsm8k"), None, tmp_path)
    args = dataset_args(Benchmark("gsm8k", prompt_template="Q: {question}"), None, tmp_path)
    assert args["prompt_template"] == "Q: {question}"
    tiny = plan(load_recipe("recipe_tiny"), {})[-1].config  # its evaluation stage
    assert tiny.benchmarks[0].prompt_template == "{question}"
    for template, message in [
        ("Q: {q}", r"not a str.format template with only \{question\}.*KeyError\('q'\)"),
        ("{question} \\boxed{}", r"write other braces doubled"),
        ("no question", r"does not contain \{question\}"),
    ]:
        bench = f"[{{name: gsm8k, prompt_template: {json.dumps(template)}}}]"
        with pytest.raises(
            ConfigError, match=r"eval.benchmarks\[0\]: benchmark gsm8k: .*" + message
        ):
            load_eval_config("eval_tiny", [f"eval.benchmarks={bench}"])


def test_bad_input_is_named(tmp_path):
    base = ["--config", "eval_tiny", *_sets(tmp_path / "e", 1)]
    assert main([*base, "--model", str(tmp_path / "missing")]) == 2
    assert main([*base, "--engine", "url"]) == 2  # no URL
    assert main([*base]) == 2  # no model for the jax engine


def test_a_server_that_dies_is_an_error_with_its_log(tmp_path, qwen_tokenizer_dir, capsys):
    model = make_qwen_model(tmp_path / "model", qwen_tokenizer_dir, vocab_size=300)
    sets = _sets(tmp_path / "e", free_port(), "eval.serve_set=[bogus.key=1]")
    assert main(["--config", "eval_tiny", "--model", str(model), *sets]) == 1
    error = capsys.readouterr().err
    assert "the jax server exited with status 2 before answering" in error
    assert "--set bogus.*" in error  # the end of the server's own log
