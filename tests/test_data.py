"""Packing, the synthetic corpus, JSONL input errors, deterministic batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA

from infir2_jax.config import DataConfig
from infir2_jax.data import DataError, PackedDataset, build_dataset, pack_documents
from infir2_jax.data.synthetic import EOS_ID, arithmetic_documents, decode


def test_packing_keeps_every_token_and_marks_documents():
    docs = [np.arange(n) + 100 * i for i, n in enumerate([5, 9, 3, 12, 4])]
    rows = pack_documents(docs, seq_len=7)  # rows of 8 tokens; 33 tokens -> 4 rows
    assert rows.tokens.shape == (4, 8)
    np.testing.assert_array_equal(rows.tokens.reshape(-1), np.concatenate(docs)[:32])
    # Row 0: doc0 (5 tokens) then doc1 starts.
    np.testing.assert_array_equal(rows.segment_ids[0], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 3, 4, 0, 1, 2])
    # Row 1 continues doc1 (restarting positions at the row start), then doc2.
    np.testing.assert_array_equal(rows.segment_ids[1], [1, 1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(rows.positions[1], [0, 1, 2, 3, 4, 5, 0, 1])
    batch = rows.batch(np.array([0]))
    np.testing.assert_array_equal(batch["labels"][0], rows.tokens[0, 1:])
    # The label that would jump from doc0's last token into doc1 does not count.
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 1, 0, 1, 1])


def test_synthetic_corpus_is_deterministic_text():
    a, b = arithmetic_documents(5, seed=3), arithmetic_documents(5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(d[-1] == EOS_ID for d in a)
    text = decode(a[0])
    lhs, rhs = text.splitlines()[0].split(" = ")
    assert eval(lhs) == int(rhs)


def test_batches_depend_only_on_seed_and_step():
    rows = pack_documents(arithmetic_documents(300), seq_len=32)
    first, second = PackedDataset(rows, 4, seed=7), PackedDataset(rows, 4, seed=7)
    steps = [0, 5, len(rows) // 4 + 1]  # the last one is in the second epoch
    for step in steps:
        np.testing.assert_array_equal(first.row_indices(step), second.row_indices(step))
    epoch = np.concatenate([first.row_indices(s) for s in range(len(rows) // 4)])
    assert len(set(epoch.tolist())) == len(epoch)  # no row repeated within an epoch
    assert not np.array_equal(PackedDataset(rows, 4, seed=8).row_indices(0), first.row_indices(0))


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    tok = tmp_path / "tok"
    tok.mkdir()
    cfg = DataConfig(source="jsonl", path=str(path), tokenizer=str(tok))
    kwargs = dict(seq_len=16, batch_size=1, seed=0, vocab_size=1000)

    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: invalid JSON"):
        build_dataset(cfg, **kwargs)
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:1: missing field 'text'"):
        build_dataset(cfg, **kwargs)
    path.write_text("\n")
    with pytest.raises(DataError, match="corpus.jsonl: no documents"):
        build_dataset(cfg, **kwargs)
    with pytest.raises(DataError, match="not found"):
        build_dataset(DataConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")), **kwargs)


def test_jsonl_with_a_real_qwen_tokenizer(tmp_path, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    lines = (SHARED_DATA / "gsm8k_test.jsonl").read_text().splitlines()[:40]
    corpus = tmp_path / "gsm8k.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": json.loads(x)["question"]}) for x in lines))
    cfg = DataConfig(source="jsonl", path=str(corpus), tokenizer=str(qwen_tokenizer_dir))
    data = build_dataset(cfg, seq_len=64, batch_size=2, seed=0, vocab_size=151936)
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    eos = tokenizer.eos_token_id
    stream = data.rows.tokens.reshape(-1)
    first_question = json.loads(lines[0])["question"]
    first_doc = stream[: list(stream).index(eos)]
    assert tokenizer.decode(first_doc) == first_question
    assert (data.rows.tokens == eos).sum() >= len(data.rows) // 2
    with pytest.raises(DataError, match="does not fit model.vocab_size"):
        build_dataset(cfg, seq_len=64, batch_size=2, seed=0, vocab_size=1000)
