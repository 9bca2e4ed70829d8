"""A stand-in for an SGLang server (CUDA-only, not installable here) for the `sglang` rollout
engine's tests: the native endpoints the engine uses, with SGLang's request and response
shapes (checked against sglang 0.5.15–0.5.23, see infir2_jax/rl/sglang.py), generating with
`transformers` from whatever weight directory it was last told to load.

- `GET /health` — 200 once a model is loaded, 503 before.
- `POST /update_weights_from_disk {"model_path", "weight_version"}` — loads the directory
  with `AutoModelForCausalLM.from_pretrained` (float32); 200 `{"success": true, ...}`, or
  400 `{"success": false, "message"}` when it cannot.
- `GET /get_weight_version` — 404, as in SGLang 0.5.9–0.5.20 (deprecated there); the version
  is in `GET /model_info`.
- `POST /generate {"input_ids": [[...]], "sampling_params": {...}, "return_logprob": true}` —
  a flat, prompt-major list of `len(input_ids) × n` outputs; `output_ids` and
  `meta_info.output_token_logprobs` ([logprob, id, null]) include the stop token; logprobs of
  softmax(logits / temperature). Supports temperature (0: greedy), `max_new_tokens`, `n`,
  `stop_token_ids`; any other truncation is refused (400) rather than silently ignored.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM


class MockSGLang:
    def __init__(self, model_path: str | None = None):
        self.model = None
        self.version = "default"
        self.lock = threading.Lock()
        self.generate_calls = 0
        self.seed = 0
        if model_path is not None:
            self.load(model_path, "default")

    def load(self, path: str, version: str | None) -> None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with self.lock:
            self.model = model
            if version is not None:
                self.version = version

    @torch.no_grad()
    def generate(self, body: dict) -> list[dict] | dict:
        ids = body["input_ids"]
        single = bool(ids) and isinstance(ids[0], int)
        prompts = [ids] if single else ids
        sp = body.get("sampling_params") or {}
        if (
            sp.get("top_p", 1.0) != 1.0
            or sp.get("top_k", -1) not in (-1, None)
            or sp.get("min_p", 0.0)
        ):
            raise ValueError("this mock samples without top-p/top-k/min-p")
        n, temperature = int(sp.get("n", 1)), float(sp.get("temperature", 1.0))
        max_new = int(sp.get("max_new_tokens", 128))
        stops = set(sp.get("stop_token_ids") or [])
        with self.lock:
            model = self.model
            self.generate_calls += 1
            self.seed += 1
            generator = torch.Generator().manual_seed(self.seed)
        outputs = []
        for prompt in prompts:
            for _ in range(n):
                tokens, pairs, reason = list(prompt), [], {"type": "length", "length": max_new}
                for _ in range(max_new):
                    logits = model(torch.tensor([tokens])).logits[0, -1].double()
                    scaled = logits / temperature if temperature > 0 else logits
                    logprobs = torch.log_softmax(scaled, -1)
                    if temperature > 0:
                        token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
                    else:
                        token = int(torch.argmax(logits))
                    tokens.append(token)
                    pairs.append([float(logprobs[token]), token, None])
                    if token in stops:
                        reason = {"type": "stop", "matched": token}
                        break
                out = tokens[len(prompt) :]
                outputs.append(
                    {
                        "text": "",
                        "output_ids": out,
                        "meta_info": {
                            "id": f"{len(outputs)}",
                            "finish_reason": reason,
                            "prompt_tokens": len(prompt),
                            "completion_tokens": len(out),
                            "output_token_logprobs": pairs,
                            "weight_version": self.version,
                        },
                    }
                )
        return outputs[0] if single and n == 1 else outputs  # SGLang: an object, or a list


def serve(mock: MockSGLang, port: int = 0) -> ThreadingHTTPServer:
    """Serves `mock` on 127.0.0.1 (port 0: a free one) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet test output
            pass

        def _send(self, status: int, body) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._send(200 if mock.model is not None else 503, None)
            elif self.path == "/model_info":
                self._send(200, {"model_path": "mock", "weight_version": mock.version})
            elif self.path == "/get_weight_version":
                self._send(404, {"detail": "deprecated. Please use '/model_info' instead"})
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/update_weights_from_disk":
                try:
                    mock.load(body["model_path"], body.get("weight_version"))
                except Exception as e:  # noqa: BLE001 - reported like SGLang does
                    self._send(400, {"success": False, "message": f"Failed: {e}."})
                    return
                self._send(200, {"success": True, "message": "Succeeded to update model weights."})
            elif self.path == "/generate":
                try:
                    outputs = mock.generate(body)
                except ValueError as e:
                    self._send(400, {"error": {"message": str(e)}})
                    return
                self._send(200, outputs)
            else:
                self._send(404, {"detail": "Not Found"})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
