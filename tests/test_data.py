"""Pre-training data: sources, packing, epochs, seeds, splits, prepared shards, input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from infir2_jax.config import ConfigError, DataConfig, DataSource, load_config, parse_section
from infir2_jax.data import (
    DataError,
    DataPipeline,
    check_vocab,
    open_source,
    sample_ids,
    split_bounds,
)
from infir2_jax.data.corpus_shards import prepare
from infir2_jax.data.gsm8k import problems
from infir2_jax.data.pipeline import Component
from infir2_jax.data.records import InMemorySource
from infir2_jax.data.synthetic import EOS_ID, arithmetic_documents, decode


def _pipeline(cfg: DataConfig, seq_len=16, batch=2, seed=0, documents=None, **kwargs):
    pipeline = DataPipeline(cfg, seq_len=seq_len, global_batch=batch, seed=seed, **kwargs)
    if documents is not None:  # swap in a hand-made corpus
        pipeline.components = [Component("memory", 1.0, InMemorySource(documents), 0)]
    return pipeline


def _batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_synthetic_corpus_is_deterministic_text():
    a, b = arithmetic_documents(5, seed=3), arithmetic_documents(5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(d[-1] == EOS_ID for d in a)
    lhs, rhs = decode(a[0]).splitlines()[0].split(" = ")
    assert eval(lhs) == int(rhs)


def test_cpt_epoch_keeps_every_token_once_in_seeded_order():
    docs = [np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate(range(3, 40, 2))]
    cfg = DataConfig()
    batches = _batches(_pipeline(cfg, documents=docs, seed=5).train_iterator(), 30)
    ids = np.concatenate([b["doc_ids"].reshape(-1) for b in batches])
    inputs = np.concatenate([b["input_ids"].reshape(-1) for b in batches])
    labels = np.concatenate([b["labels"].reshape(-1) for b in batches])
    per_epoch = sum(len(d) - 1 for d in docs)
    assert len(ids) > per_epoch  # the batches reach into the second epoch
    # The first epoch is every document once (in a shuffled order), token for token.
    first = ids[:per_epoch]
    order = [int(i) - 1 for i in first[np.r_[True, first[1:] != first[:-1]]]]
    assert sorted(order) == list(range(len(docs))) and order != sorted(order)
    expected = np.concatenate([docs[i][:-1] for i in order])
    np.testing.assert_array_equal(inputs[:per_epoch], expected)
    np.testing.assert_array_equal(labels[:per_epoch], np.concatenate([docs[i][1:] for i in order]))
    # Rows mark their documents: segment ids number them, positions restart with each.
    row = batches[0]
    for r in range(row["doc_ids"].shape[0]):
        starts = np.r_[True, row["doc_ids"][r, 1:] != row["doc_ids"][r, :-1]]
        np.testing.assert_array_equal(row["segment_ids"][r], np.cumsum(starts))
        assert (row["positions"][r][starts] == 0).all()
    # The same seed gives the same batches; another seed another order; epoch 2 reshuffles.
    again = _batches(_pipeline(cfg, documents=docs, seed=5).train_iterator(), 30)
    for x, y in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    other = _batches(_pipeline(cfg, documents=docs, seed=6).train_iterator(), 1)[0]
    assert not np.array_equal(other["doc_ids"], batches[0]["doc_ids"])
    second = ids[per_epoch : 2 * per_epoch]
    assert not np.array_equal(first, second[: len(first)])


def test_packed_rows_do_not_attend_across_documents():
    """A packed row's logits equal each of its documents run alone."""
    import jax.numpy as jnp
    from flax import nnx

    from infir2_jax.model import Qwen2, preset

    model = Qwen2(preset("tiny").replace(vocab_size=257, dtype="float32"), rngs=nnx.Rngs(0))
    docs = arithmetic_documents(30, seed=1)
    batch = _batches(_pipeline(DataConfig(), seq_len=96, documents=docs).train_iterator(), 1)[0]
    row = {k: jnp.asarray(v[:1]) for k, v in batch.items()}
    packed = np.asarray(model(row["input_ids"], row["positions"], row["segment_ids"]))[0]
    seg = batch["segment_ids"][0]
    for s in np.unique(seg)[1:-1]:  # documents wholly inside the row
        where = np.nonzero(seg == s)[0]
        alone = np.asarray(model(row["input_ids"][:, where]))[0]
        np.testing.assert_allclose(packed[where], alone, atol=2e-5)


def test_hosts_read_disjoint_shards():
    docs = [np.full(5, i, np.int32) for i in range(40)]
    seen = []
    for host in range(2):
        p = _pipeline(DataConfig(), documents=docs, batch=4, process_index=host, process_count=2)
        assert p.host_batch == 2
        batches = _batches(p.train_iterator(), 3)
        seen.append({i for b in batches for row in sample_ids(b) for i in row})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert all(i % 2 == 0 for i in seen[0]) and all(i % 2 == 1 for i in seen[1])


def test_worker_processes_are_deterministic_and_resumable():
    """data.workers > 0: the order is fixed by seed and worker count, and a saved iterator
    state (through JSON, as in a checkpoint) continues with exactly the next batch."""
    cfg = DataConfig(workers=2, synthetic_documents=3000)

    def iterator():
        return _pipeline(cfg, seq_len=64, batch=4).train_iterator()

    first = iterator()
    head = _batches(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    tail = _batches(first, 3)
    first.close()
    second = iterator()
    for x, y in zip(head, _batches(second, 4), strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    second.close()
    resumed = iterator()
    resumed.set_state(state)
    for x, y in zip(tail, _batches(resumed, 3), strict=True):
        np.testing.assert_array_equal(x["doc_ids"], y["doc_ids"])
    resumed.close()


def test_split_bounds_and_validation_batches():
    assert split_bounds(1000, (0.9, 0.05, 0.05)) == [(0, 900), (900, 950), (950, 1000)]
    docs = [np.arange(12, dtype=np.int32) + 100 * i for i in range(40)]
    p = _pipeline(DataConfig(split=(0.9, 0.05, 0.05)), documents=docs)
    val = p.eval_batches(100)
    val_ids = {i for b in val for row in sample_ids(b) for i in row}
    assert val_ids <= set(range(36, 38))  # never a training document
    assert [sample_ids(b) for b in p.eval_batches(100)] == [sample_ids(b) for b in val]
    train = _batches(p.train_iterator(), 40)
    assert {i for b in train for row in sample_ids(b) for i in row} == set(range(36))
    with pytest.raises(DataError, match="validation split"):
        _pipeline(DataConfig(), documents=docs).eval_batches(1)


def _gsm8k_texts(tmp_path, n=40):
    return [r["question"] for r in problems()[:n]]


def test_jsonl_parquet_arrayrecord_and_prepared_agree(tmp_path, qwen_tokenizer_dir):
    """The same documents from every source give the same batches; prepared shards record
    the token counts; the text comes back from the tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter
    from transformers import AutoTokenizer

    texts = _gsm8k_texts(tmp_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    writer = ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
    for t in texts:
        writer.write(json.dumps({"body": t}).encode())
    writer.close()
    common = dict(text_field="body", tokenizer=str(qwen_tokenizer_dir))
    configs = {
        name: DataConfig(source=name, path=str(tmp_path / f"c.{ext}"), **common)
        for name, ext in (
            ("jsonl", "jsonl"),
            ("parquet", "parquet"),
            ("arrayrecord", "array_record"),
        )
    }
    summary = prepare(configs["jsonl"], tmp_path / "prepared", docs_per_shard=15, progress=False)
    assert summary["documents"] == 40 and len(summary["shards"]) == 3
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    expected = sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + EOS each
    assert summary["tokens"] == expected
    configs["prepared"] = DataConfig(source="prepared", path=str(tmp_path / "prepared"))

    results = {
        name: _batches(_pipeline(cfg, seq_len=64, batch=2).train_iterator(), 4)
        for name, cfg in configs.items()
    }
    for name, batches in results.items():
        for x, y in zip(results["jsonl"], batches, strict=True):
            for key in ("input_ids", "labels", "segment_ids", "doc_ids"):
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name} {key}")
    row = results["jsonl"][0]
    first = sample_ids(row)[0][0]
    tokens = row["input_ids"][0][row["doc_ids"][0] == first + 1]
    assert texts[first].startswith(tokenizer.decode(tokens[: min(len(tokens), 10)]))
    check_vocab(row, 151936)
    with pytest.raises(DataError, match=r"token id \d+ does not fit model.vocab_size=1000"):
        check_vocab(row, 1000)


def test_bad_input_names_the_file_and_line(tmp_path, qwen_tokenizer_dir):
    path = tmp_path / "corpus.jsonl"
    cfg = DataConfig(source="jsonl", path=str(path), tokenizer=str(qwen_tokenizer_dir))
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2:2: invalid JSON: Expecting property name"):
        _pipeline(cfg)
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:3: missing field 'text'"):
        _pipeline(cfg)
    path.write_text("\n")
    with pytest.raises(DataError, match="corpus.jsonl: no documents"):
        _pipeline(cfg)
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        _pipeline(DataConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")))
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:1: field 'text' is not a string"):
        _batches(_pipeline(cfg).train_iterator(), 1)
    path.write_text(json.dumps({"text": "ok"}) + "\n")
    with pytest.raises(DataError, match=r"data.tokenizer: .*missing_tok: tokenizer directory"):
        _pipeline(
            DataConfig(source="jsonl", path=str(path), tokenizer=str(tmp_path / "missing_tok"))
        )
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="t.parquet: not a readable Parquet file"):
        _pipeline(DataConfig(source="parquet", path=str(tmp_path / "t.parquet")))


def test_training_cli_reports_a_malformed_line_and_exits_2(tmp_path, qwen_tokenizer_dir):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "cut' + "\n")
    cmd = [sys.executable, "-m", "infir2_jax.train", "--config", "tiny_cpt"]
    for setting in (f"train.run_dir={tmp_path / 'run'}", "data.source=jsonl", f"data.path={path}",
                    f"data.tokenizer={qwen_tokenizer_dir}"):  # fmt: skip
        cmd += ["--set", setting]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    # file:line:column and json's whole reason, not cut at "at".
    assert (
        f"error: {path}:2:14: invalid JSON: Invalid control character at column 14 (found '\\n')"
    ) in r.stderr, r.stderr


def test_bundled_data_sets_are_in_the_package():
    from infir2_jax.data.bundled import bundled_path

    gsm8k = [json.loads(x) for x in bundled_path("gsm8k_test").read_text().splitlines()]
    aime = [json.loads(x) for x in bundled_path("aime24").read_text().splitlines()]
    assert len(gsm8k) == 1319 and all(r["answer"].rpartition("####")[2].strip() for r in gsm8k)
    assert len(aime) == 30 and all(r["answer"].isdigit() and r["problem"] for r in aime)
    assert (bundled_path("gsm8k_test").parent / "README.md").is_file()  # sources, licences
    with pytest.raises(DataError, match="not a bundled data set"):
        bundled_path("math500")
    # recipe_tiny's facts: the shipped file is what its generator writes, and data.path names it.
    from infir2_jax.data.gsm8k import conversations, problems
    from infir2_jax.data.synthetic import multiplication_problems

    facts = [json.loads(x) for x in bundled_path("arithmetic").read_text().splitlines()]
    assert facts == multiplication_problems() == problems("arithmetic")
    first = conversations("arithmetic")[0]["messages"]
    assert first[1] == {"role": "user", "content": "What is 1 * 1?"}
    assert first[2] == {"role": "assistant", "content": "1 * 1 = 1\nThe answer is \\boxed{1}."}


def test_gsm8k_source_equals_the_jsonl_the_cli_writes(tmp_path):
    """`data.source: gsm8k` (nothing on disk) and the file `python -m infir2_jax.data.gsm8k`
    writes give identical SFT batches; CPT documents are question + worked answer."""
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.data.gsm8k", "--out", str(tmp_path / "sft")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    tokenizer = str(tmp_path / "sft" / "tokenizer")
    common = dict(kind="sft", tokenizer=tokenizer, chat_template="qwen2.5", split=(0.9, 0.1, 0.0))
    bundled = _pipeline(DataConfig(source="gsm8k", **common), seq_len=256)
    written = _pipeline(
        DataConfig(source="jsonl", path=str(tmp_path / "sft" / "sft.jsonl"), **common), seq_len=256
    )
    a_batches = _batches(bundled.train_iterator(), 2)
    for a, b in zip(a_batches, _batches(written.train_iterator(), 2), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    cpt = open_source(DataConfig(source="gsm8k"))
    assert len(cpt) == 1319 and cpt[0].value["text"].endswith("The answer is \\boxed{18}.")


def test_gsm8k_cli_missing_input_is_a_clear_error_leaving_nothing(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.data.gsm8k", "--gsm8k", str(tmp_path / "nope.jsonl"),
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: gsm8k: {tmp_path / 'nope.jsonl'}: data file not found"
    assert not (tmp_path / "out").exists()


def test_an_oversized_document_is_refused_by_file_and_line_with_bounded_reads(tmp_path):
    from infir2_jax.data.records import DataError, JsonlSource

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": "ok"}) + "\n")
        f.write(json.dumps({"text": "x" * 5000}) + "\n")
    assert len(JsonlSource([path], "text", max_bytes=6000)) == 2
    with pytest.raises(DataError, match=r"big.jsonl:2: a record of more than 1,000 bytes"):
        JsonlSource([path], "text", max_bytes=1000)
    from infir2_jax.data.pipeline import open_source

    cfg = DataConfig(source="jsonl", path=str(path), max_document_bytes=1000)
    with pytest.raises(DataError, match=r"data.max_document_bytes"):
        open_source(cfg)


def test_invalid_unicode_is_refused_by_file_and_line_at_validation(tmp_path):
    from infir2_jax.data.records import DataError, JsonlSource

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a lone \\ud800 surrogate"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text' holds invalid Unicode"):
        JsonlSource([path], "text")
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON: not UTF-8"):
        JsonlSource([path], "text")
    chats = tmp_path / "chat.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "\\udc80"}]}\n')
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages' holds invalid Unicode"):
        JsonlSource([chats], "messages")


def _token_corpus(path, first, count, length=7):
    """A JSONL corpus of token-id documents; the ids of document i are first + i (one id per
    document, so a row's tokens name its documents)."""
    path.write_text("".join(json.dumps({"ids": [first + i] * length}) + "\n" for i in range(count)))
    return str(path)


def _mixture(tmp_path, weights=(0.25, 0.75), **kwargs):
    sources = [
        {"path": _token_corpus(tmp_path / "a.jsonl", 1000, 50), "weight": weights[0]},
        {"path": _token_corpus(tmp_path / "b.jsonl", 5000, 80), "weight": weights[1]},
    ]
    raw = {"source": "jsonl", "tokens_field": "ids", "sources": sources, **kwargs}
    return parse_section(DataConfig, raw, "data")


def test_a_cpt_state_taken_where_a_row_ends_a_document_resumes_exactly(tmp_path):
    """Checkpoints keep the iterator state as JSON, where grain's concat-then-split marker for
    "no partly used document", a tuple, comes back as a list (data/kinds.py `_JsonState`)."""
    path = _token_corpus(tmp_path / "c.jsonl", 1000, 50)  # documents of 6 inputs, rows of 12
    cfg = DataConfig(source="jsonl", tokens_field="ids", path=path)
    iterator = _pipeline(cfg, seq_len=12).train_iterator()
    _batches(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    assert '"remainder_slices": {"input_ids": [-1, -1]' in json.dumps(state)
    resumed = _pipeline(cfg, seq_len=12).train_iterator()
    resumed.set_state(state)
    for x, y in zip(_batches(iterator, 3), _batches(resumed, 3), strict=True):
        np.testing.assert_array_equal(x["doc_ids"], y["doc_ids"])


def test_mixture_draws_rows_by_weight_and_resumes_to_the_exact_sample(tmp_path):
    cfg = _mixture(tmp_path)
    pipeline = _pipeline(cfg, seq_len=16, batch=4)
    assert [(c.name, c.offset) for c in pipeline.components] == [("a.jsonl", 0), ("b.jsonl", 50)]
    iterator = pipeline.train_iterator()
    head = _batches(iterator, 10)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint keeps it
    tail = _batches(iterator, 90)
    counts = {"a.jsonl": 0, "b.jsonl": 0}
    for batch in head + tail:
        for name, n in pipeline.source_rows(batch).items():
            counts[name] += n
        # A row holds one source's documents; its sample ids say which (a: 0-49, b: 50-129),
        # and its tokens are that document's.
        for row, ids in zip(batch["input_ids"], sample_ids(batch), strict=True):
            assert all(i < 50 for i in ids) or all(i >= 50 for i in ids)
            expected = [1000 + i if i < 50 else 5000 + i - 50 for i in ids]
            assert sorted(set(row.tolist())) == sorted(set(expected))
    assert sum(counts.values()) == 400
    assert abs(counts["a.jsonl"] / 400 - 0.25) < 0.01, counts
    # Both sources went round more than once (an epoch of a: ~19 rows of 16 tokens).
    assert counts["a.jsonl"] > 2 * 50 * 6 / 16
    # Resumed from the state after 10 batches: exactly the batches that followed.
    resumed = _pipeline(cfg, seq_len=16, batch=4).train_iterator()
    resumed.set_state(state)
    for x, y in zip(tail[:20], _batches(resumed, 20), strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    # Other weights, other shares; the same weights, the same batches.
    skewed = _pipeline(_mixture(tmp_path, (0.9, 0.1)), seq_len=16, batch=4).train_iterator()
    shares = [pipeline.source_rows(b)["a.jsonl"] for b in _batches(skewed, 25)]
    assert abs(sum(shares) / 100 - 0.9) < 0.02
    again = _pipeline(cfg, seq_len=16, batch=4).train_iterator()
    for x, y in zip(head, _batches(again, 10), strict=True):
        np.testing.assert_array_equal(x["doc_ids"], y["doc_ids"])


def test_mixture_validation_batches_and_errors_name_the_source(tmp_path):
    cfg = _mixture(tmp_path, split=[0.8, 0.2, 0.0])
    val = _pipeline(cfg, seq_len=16, batch=2).eval_batches(50)
    ids = {i for b in val for row in sample_ids(b) for i in row}
    # Every held-out sample of both sources, whatever the weights: validation is not a mix
    # that ends when the smaller source runs out.
    assert ids == set(range(40, 50)) | set(range(114, 130))
    skewed = _mixture(tmp_path, (0.95, 0.05), split=[0.8, 0.2, 0.0])
    again = _pipeline(skewed, seq_len=16, batch=2).eval_batches(50)
    assert {i for b in again for row in sample_ids(b) for i in row} == ids
    (tmp_path / "b.jsonl").write_text('{"ids": [1, 2]}\n{"ids": [3,\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2:\d+: invalid JSON"):
        _pipeline(cfg)
    missing = {"sources": [{"path": str(tmp_path / "a.jsonl"), "weight": 1}, {"weight": 1}]}
    with pytest.raises(DataError, match=r"^data\.sources\[1\]\.path: required"):
        _pipeline(
            parse_section(DataConfig, {"source": "jsonl", "tokens_field": "ids", **missing}, "data")
        )
    with pytest.raises(DataError, match="data.sources: prepare one corpus at a time"):
        prepare(cfg, tmp_path / "out")


@pytest.mark.parametrize(
    "sources, message",
    [
        ([], r"data\.sources: at least one source"),
        ([{"path": "a", "weight": 0}], r"data\.sources\[0\]: weight: must be positive and finite"),
        ([{"path": "a", "weight": -1}], r"data\.sources\[0\]: weight: must be positive"),
        (
            [{"path": "a", "weight": 1}, {"path": "b", "weight": float("nan")}],
            r"sources\[1\]: weight",
        ),
        ([{"path": "a", "weight": "inf"}], r"data\.sources\[0\]: weight: must be positive and"),
        ([{"path": "a"}], r"missing required config key 'data\.sources\[0\]\.weight'"),
        ([{"path": "x/a", "weight": 1}, {"path": "y/a", "weight": 1}], r"sources\[1\]\.name: 'a'"),
    ],
)
def test_mixture_settings_are_checked_by_name(sources, message):
    with pytest.raises(ConfigError, match=message):
        parse_section(DataConfig, {"source": "jsonl", "sources": sources}, "data")


def test_mixture_and_a_single_path_are_exclusive_in_a_config_file(tmp_path):
    setting = "data.sources=[{path: a.jsonl, weight: 1}]"
    with pytest.raises(ConfigError, match="data.sources and data.path are mutually exclusive"):
        load_config("tiny_sft", [setting, "data.path=b.jsonl"])
    cfg = load_config("tiny_cpt", [setting, "data.source=jsonl"])
    assert cfg.data.sources[0] == DataSource(weight=1.0, path="a.jsonl")


def test_the_bytes_tokenizer_is_one_token_per_byte_with_qwens_chat_tokens(tmp_path):
    """`data.tokenizer: bytes` (recipe_tiny's): byte b is id b, any text round-trips, the chat
    tokens are single ids after the bytes, the template is qwen2.5's; the shipped files are
    what write_byte_tokenizer writes."""
    from infir2_jax.data.byte_tokenizer import VOCAB_SIZE, write_byte_tokenizer
    from infir2_jax.data.tokenizer import chat_template_path, load_tokenizer, tokenizer_dir

    tokenizer = load_tokenizer("bytes")
    assert len(tokenizer) == VOCAB_SIZE == 259
    text = "What is 4 * 9?\n\tÄ€ \\boxed{36}.\x00"
    assert tokenizer.encode(text) == list(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>")}
    assert ids == {"<|endoftext|>": 256, "<|im_start|>": 257}
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (258, 256)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2 * 3?"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nWhat is 2 * 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.encode(prompt)[:2] == [257, ord("s")]
    assert tokenizer.chat_template == chat_template_path("qwen2.5").read_text()

    write_byte_tokenizer(tmp_path)
    shipped = tokenizer_dir("bytes")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads(
            (shipped / name).read_text()
        ), name
    with pytest.raises(DataError, match=r"eval.tokenizer: nowhere: tokenizer directory not found"):
        tokenizer_dir("nowhere", key="eval.tokenizer")
