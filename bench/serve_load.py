"""Load test of `python -m infir2_jax.serve`: a tiny random model (Qwen2.5's vocabulary and
tokenizer) served on 127.0.0.1, many concurrent clients, short and long requests, some
clients leaving mid-request.

    python bench/serve_load.py [--requests 200] [--clients 32] [--baseline 64]

1. Reference: every prompt's greedy answer from `Engine.generate` (one call per length).
2. Warm-up (compiles the prefill shapes; not measured): the baseline requests, then half as
   many requests as the load, drawn like it. Baseline: `--baseline` short requests (1-8 new
   tokens) from `--clients` clients, nothing else in flight: their latency.
3. Load: `--requests` requests from `--clients` clients: a quarter long (160-256 new
   tokens), the rest short; every tenth request's client gives up after 0.3 s (the server
   must cancel it). Every answered request must equal its reference; short requests'
   latency is reported with the long ones in flight.
4. Afterwards the engine must be idle (cancelled work freed) within 10 s.

Every request is bounded (a 300 s client timeout); the whole run is bounded by the count.
Not a test: record the figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import uvicorn  # noqa: E402

from infir2_jax.generate import SamplingParams  # noqa: E402
from infir2_jax.serve.__main__ import build, parse_args  # noqa: E402

MAX_LEN = 512


def make_model(directory: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from infir2_jax.data.bundled import qwen_tokenizer_dir

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        max_position_embeddings=MAX_LEN,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    for f in qwen_tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy(f, directory / f.name)
    return directory


def serve(model_dir: Path, slots: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parse_args(
        ["--model", str(model_dir), "--batch-size", str(slots), "--max-len", str(MAX_LEN),
         "--steps-per-call", "8", "--set", "model.dtype=float32"]
    )  # fmt: skip
    app, scheduler = build(args)
    httpd = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=httpd.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    return url, scheduler, httpd


def plan(count: int, long_share: float, seed: int, leave_every: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        long = rng.random() < long_share
        prompt = rng.integers(0, 151_000, int(rng.integers(4, 48))).tolist()
        new = int(rng.integers(160, 257) if long else rng.integers(1, 9))
        leaves = bool(leave_every) and i % leave_every == leave_every - 1
        jobs.append({"prompt": prompt, "max_tokens": new, "long": long, "leaves": leaves})
    return jobs


def references(engine, jobs: list[dict]) -> None:
    """Greedy answers: one generation per kind at its longest length, cut to each job's
    `max_tokens` (greedy output is a prefix of the longer one)."""
    for kind in (False, True):
        group = [j for j in jobs if j["long"] == kind]
        if not group:
            continue
        longest = max(j["max_tokens"] for j in group)
        answers = engine.generate(
            [j["prompt"] for j in group], SamplingParams(temperature=0, max_new_tokens=longest)
        )
        for j, (c,) in zip(group, answers, strict=True):
            ids = c.output_ids[: j["max_tokens"]]
            j["expected"] = engine.tokenizer.decode(ids, skip_special_tokens=True)


def ask(url: str, job: dict) -> dict:
    body = {"prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0}
    t0 = time.perf_counter()
    try:
        r = requests.post(f"{url}/v1/completions", json=body, timeout=0.3 if job["leaves"] else 300)
    except requests.exceptions.ReadTimeout:
        return {**job, "outcome": "left", "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        return {**job, "outcome": f"http {r.status_code}", "seconds": seconds}
    text = r.json()["choices"][0]["text"]
    expected = job.get("expected") or text  # warm-up requests are not checked
    outcome = "ok" if text == expected else "wrong"
    return {**job, "outcome": outcome, "seconds": seconds}


def run(url: str, jobs: list[dict], clients: int) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda j: ask(url, j), jobs))
    return results, time.perf_counter() - t0


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "n/a"
    p50, p99 = np.percentile(seconds, [50, 99])
    return f"p50 {p50 * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms (n={len(seconds)})"


def report(name: str, results: list[dict], wall: float) -> None:
    outcomes = {o: sum(r["outcome"] == o for r in results) for o in {r["outcome"] for r in results}}
    short = [r["seconds"] for r in results if not r["long"] and r["outcome"] == "ok"]
    long = [r["seconds"] for r in results if r["long"] and r["outcome"] == "ok"]
    print(f"{name}: {len(results)} requests in {wall:.1f} s, outcomes {outcomes}")
    print(f"  short latency: {percentiles(short)}")
    if long:
        print(f"  long latency: {percentiles(long)}; median {statistics.median(long):.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--baseline", type=int, default=64)
    p.add_argument("--slots", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "tiny-qwen")
        url, scheduler, httpd = serve(model_dir, args.slots)
        baseline = plan(args.baseline, 0.0, seed=1)
        load = plan(args.requests, 0.25, seed=2, leave_every=10)
        warm = plan(args.requests // 2, 0.25, seed=4, leave_every=10)
        t0 = time.perf_counter()
        references(scheduler.engine, baseline + load)
        print(f"references: {time.perf_counter() - t0:.1f} s (Engine.generate)")
        run(url, baseline, args.clients)  # warm-ups: compile the prefill shapes
        run(url, [{**j, "expected": None} for j in warm], args.clients)
        results, wall = run(url, baseline, args.clients)
        report("baseline (short only)", results, wall)
        wrong = sum(r["outcome"] != "ok" for r in results)
        results, wall = run(url, load, args.clients)
        report("load (short + long + leaving)", results, wall)
        wrong += sum(r["outcome"] not in ("ok", "left") for r in results)
        idle = time.perf_counter()
        while not scheduler.idle() and time.perf_counter() - idle < 10:
            time.sleep(0.05)
        idle = scheduler.idle()
        print(f"engine idle afterwards: {idle}; samples cancelled: {scheduler.cancelled}")
        httpd.should_exit = True
        scheduler.close()
    return 1 if wrong or not idle else 0


if __name__ == "__main__":
    sys.exit(main())
