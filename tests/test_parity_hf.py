"""Logits parity with Hugging Face `transformers` Qwen2ForCausalLM (float32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model

import infir2_jax
from infir2_jax.checkpoint.convert import hf_to_orbax

CONFIGS = {
    # untied, GQA 3:1, head_dim 20 and widths that are neither powers of two nor 128-multiples
    "untied_gqa_theta1e4": dict(),
    # tied embeddings, one kv head (MQA), rope theta 1e6
    "tied_mqa_theta1e6": dict(
        tie_word_embeddings=True, num_key_value_heads=1, rope_theta=1e6, num_hidden_layers=3
    ),
    # multi-head (kv == heads), odd head_dim*heads != hidden, eps 1e-5
    "mha_headdim_not_hidden_over_heads": dict(
        hidden_size=72, num_attention_heads=4, num_key_value_heads=4, head_dim=22, rms_norm_eps=1e-5
    ),
    # several kv heads, bigger intermediate, tied
    "tied_kv4": dict(
        hidden_size=96,
        intermediate_size=232,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=12,
        tie_word_embeddings=True,
        rope_theta=1e6,
    ),
}
TOLERANCE = 1e-4


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_from_hf_and_orbax(tmp_path, name):
    hf = make_hf_model(tmp_path / "hf", **CONFIGS[name])
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(2, 33))
    reference = _hf_logits(hf, ids)

    ours = infir2_jax.from_pretrained(tmp_path / "hf", dtype="float32")
    logits = np.asarray(ours(jnp.asarray(ids)))
    assert logits.shape == (2, 33, hf.config.vocab_size)
    assert np.abs(logits - reference).max() <= TOLERANCE

    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax")
    from_orbax = infir2_jax.from_pretrained(tmp_path / "orbax", dtype="float32")
    assert np.abs(np.asarray(from_orbax(jnp.asarray(ids))) - reference).max() <= TOLERANCE


def test_packed_batch_equals_separate_sequences(tmp_path):
    hf = make_hf_model(tmp_path / "hf", tie_word_embeddings=True)
    model = infir2_jax.from_pretrained(tmp_path / "hf", dtype="float32")
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 300, size=n) for n in (7, 12, 5)]
    packed = np.concatenate(docs)[None]
    segment_ids = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in docs])[None]
    logits = np.asarray(
        model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segment_ids))
    )

    start = 0
    for doc in docs:
        alone = np.asarray(model(jnp.asarray(doc[None])))
        np.testing.assert_allclose(logits[0, start : start + len(doc)], alone[0], atol=1e-5)
        np.testing.assert_allclose(alone, _hf_logits(hf, doc[None]), atol=TOLERANCE)
        start += len(doc)


def test_bfloat16_model_is_close_to_float32(hf_model_dir):
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 300, size=(1, 16)))
    f32 = np.asarray(infir2_jax.from_pretrained(hf_model_dir, dtype="float32")(ids))
    bf16_model = infir2_jax.from_pretrained(hf_model_dir, dtype="bfloat16")
    assert bf16_model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    bf16 = np.asarray(bf16_model(ids))
    # bf16 has 8 mantissa bits: ~0.4% relative per op; logits here are O(1).
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()
