"""python -m infir2_jax.serve --model PATH [--host 127.0.0.1] [--port 8000] [--set ...]

Serves a model (HF directory, Orbax checkpoint or run directory) through OpenAI's API —
`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health` — on the generation engine:
each request's samples are scheduled into the engine's decode slots as they free up
(continuous batching across requests; new requests join between chunks of
`--steps-per-call` decode steps; a client that disconnects has its work cancelled). The
chat template is `--chat-template` (a built-in name or a Jinja file), else the model
directory's, else Qwen2.5's. `stream: true` is answered with server-sent events. Limits:
prompt + max_tokens within `--max-len` (400 context_length_exceeded; unset max_tokens: the
room left), `--max-samples-per-request`, `--max-body-bytes`; `--api-key` guards /v1.
`--set model.dtype=float32`, `--set fp8.recipe=blockwise`, `--set parallel.tensor=2` as for
`python -m infir2_jax.generate`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infir2_jax.cli import MODEL_SET_HELP, USAGE, Exit, add_set, attempt, command_parser
from infir2_jax.serve.limits import DEFAULT_MAX_BODY, DEFAULT_MAX_SAMPLES, Limits

DEFAULT_CHAT_TEMPLATE = "qwen2.5"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("python -m infir2_jax.serve", __doc__)
    p.add_argument("--model", required=True, help="HF directory or Orbax checkpoint / run dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--served-model-name",
        help="the model id of /v1/models and responses (default: the model directory's name)",
    )
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (401 otherwise)")
    p.add_argument(
        "--max-samples-per-request", type=int, default=DEFAULT_MAX_SAMPLES,
        help="prompts × n one request may ask for (400 beyond)",
    )  # fmt: skip
    p.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
        help="largest request body (413 beyond)",
    )  # fmt: skip
    p.add_argument("--tokenizer", help="tokenizer dir, `qwen` or `bytes` (default: the model's)")
    p.add_argument("--chat-template", help="built-in name (qwen2.5) or a Jinja file")
    p.add_argument("--batch-size", type=int, default=64, help="decode slots (concurrent samples)")
    p.add_argument("--max-len", type=int, help="KV cache tokens per slot (default: the model's)")
    p.add_argument(
        "--steps-per-call", type=int, default=16,
        help="decode steps per dispatch (new requests join between dispatches)",
    )  # fmt: skip
    add_set(p, MODEL_SET_HELP)
    return p.parse_args(argv)


def served_name(args: argparse.Namespace) -> str:
    """The model id clients see: `--served-model-name`, else the model directory's name
    (never its filesystem path)."""
    return args.served_model_name or Path(args.model).resolve().name


def build(args: argparse.Namespace):
    """(the app, its scheduler) for these arguments: the model loaded, nothing served yet."""
    from infir2_jax.data import DataError
    from infir2_jax.data.tokenizer import chat_template_path
    from infir2_jax.generate.loading import find_tokenizer, load_engine
    from infir2_jax.serve.app import create_app
    from infir2_jax.serve.scheduler import Scheduler

    tokenizer = find_tokenizer(args.model, args.tokenizer, args.chat_template)
    if tokenizer is None:
        raise DataError(f"--model {args.model}: no tokenizer beside it (pass --tokenizer DIR)")
    if not tokenizer.chat_template:  # a model without one is served with Qwen2.5's
        tokenizer.chat_template = chat_template_path(DEFAULT_CHAT_TEMPLATE).read_text()
    engine = load_engine(
        args.model, args.set, tokenizer=tokenizer, slots=args.batch_size,
        steps_per_call=args.steps_per_call, max_len=args.max_len,
    )  # fmt: skip
    scheduler = Scheduler(engine)
    name = served_name(args)
    limits = Limits(args.max_samples_per_request, args.max_body_bytes)
    app = create_app(
        scheduler, model_name=name, tokenizer=tokenizer, limits=limits, api_key=args.api_key
    )
    return app, scheduler


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from infir2_jax.checkpoint import CheckpointError
    from infir2_jax.config import ConfigError
    from infir2_jax.data import DataError

    # Only loading the model maps errors to a status: the server's own failures stay loud.
    status, built = attempt(
        lambda: build(args), Exit((ConfigError, DataError, CheckpointError, ValueError), USAGE)
    )
    if status:
        return status
    app, scheduler = built
    print(f"serving {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        scheduler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
