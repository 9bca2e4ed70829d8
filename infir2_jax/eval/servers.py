"""The inference server an evaluation talks to: SGLang or our own started for the run (and
stopped at its end, also on Ctrl-C / SIGTERM), or one already running at a URL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from infir2_jax.config import EvalConfig


class ServerError(RuntimeError):
    """The server did not start, or died; the message ends with its log."""


def server_command(cfg: EvalConfig, model_dir: Path) -> list[str]:
    if cfg.engine == "sglang":
        return [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir),
            "--served-model-name", cfg.served_model_name, "--host", "127.0.0.1",
            "--port", str(cfg.port), "--tp-size", str(cfg.tensor_parallel),
            "--dp-size", str(cfg.data_parallel), "--mem-fraction-static", str(cfg.mem_fraction),
        ]  # fmt: skip
    command = [
        sys.executable, "-m", "infir2_jax.serve", "--model", str(model_dir),
        "--served-model-name", cfg.served_model_name, "--host", "127.0.0.1",
        "--port", str(cfg.port), "--batch-size", str(cfg.serve_batch_size),
    ]  # fmt: skip
    if cfg.chat_template:
        command += ["--chat-template", cfg.chat_template]
    if cfg.serve_max_len:
        command += ["--max-len", str(cfg.serve_max_len)]
    for assignment in cfg.serve_set:
        command += ["--set", assignment]
    return command


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running_server(cfg: EvalConfig, model_dir: Path | None, log: Path) -> Iterator[str]:
    """Yields the server's OpenAI base URL (…/v1) while it runs."""
    if cfg.engine == "url":
        url = cfg.url.rstrip("/")
        yield url if url.endswith("/v1") else f"{url}/v1"
        return
    command = server_command(cfg, model_dir)
    root = f"http://127.0.0.1:{cfg.port}"
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        print(f"starting the {cfg.engine} server ({root}; log {log})", flush=True)
        deadline = time.monotonic() + cfg.startup_timeout
        while True:
            if process.poll() is not None:
                raise ServerError(
                    f"the {cfg.engine} server exited with status {process.returncode} "
                    f"before answering; the end of {log}:\n{_tail(log)}"
                )
            try:
                if requests.get(f"{root}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the {cfg.engine} server did not answer /health within "
                    f"{cfg.startup_timeout:.0f} s; the end of {log}:\n{_tail(log)}"
                )
            time.sleep(1.0)
        yield f"{root}/v1"
        if process.poll() is not None:
            raise ServerError(
                f"the {cfg.engine} server died during the evaluation (status "
                f"{process.returncode}); the end of {log}:\n{_tail(log)}"
            )
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
