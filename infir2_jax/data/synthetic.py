"""The embedded default corpus: generated arithmetic text under a byte-level tokenizer.

It needs no download and no tokenizer files, and it is learnable (a tiny model quickly picks
up the format and the easy digits), so the tiny default run shows a clearly falling loss.
"""

from __future__ import annotations

import numpy as np

EOS_ID = 256  # bytes take ids 0..255
VOCAB_SIZE = 257


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids: np.ndarray) -> str:
    return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


def _line(rng: np.random.Generator) -> str:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    op = rng.integers(0, 3)
    if op == 0:
        return f"{a} + {b} = {a + b}"
    if op == 1:
        return f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}"
    return f"{a % 13} * {b % 13} = {(a % 13) * (b % 13)}"


def arithmetic_documents(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` documents of 2-6 arithmetic facts each, byte-encoded and ending with EOS."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        lines = [_line(rng) for _ in range(int(rng.integers(2, 7)))]
        docs.append(np.append(encode("\n".join(lines) + "\n"), EOS_ID))
    return docs


def multiplication_problems() -> list[dict]:
    """The 81 facts a * b (1 <= a, b <= 9) as GSM8K-format problems: `question` "What is
    a * b?", `answer` "a * b = c\n#### c". Bundled as `arithmetic` (assets/arithmetic.jsonl):
    a task with the Qwen vocabulary that a tiny model learns within recipe_tiny's steps, in
    every stage's layout (CPT documents, SFT chats, RL prompts, an evalscope GSM8K set)."""
    return [
        {"question": f"What is {a} * {b}?", "answer": f"{a} * {b} = {a * b}\n#### {a * b}"}
        for a in range(1, 10)
        for b in range(1, 10)
    ]
