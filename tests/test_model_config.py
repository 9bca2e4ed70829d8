"""Presets, parameter counts, eval_shape of full-size models, HF config bridge."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from transformers import Qwen2Config

from infir2_jax.model import PRESETS, Qwen2, from_hf_config, preset, to_hf_config

PUBLISHED_PARAMS = {"qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstractly(name):
    cfg = preset(name)
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params
    q = model.layers.self_attn.q_proj.kernel
    assert q.shape == (cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    assert (model.lm_head is None) == cfg.tie_embeddings
    # Logits of a [1, 8] batch: shapes only, nothing allocated even for 72B.
    logits = nnx.eval_shape(lambda m: m(jax.numpy.zeros((1, 8), jax.numpy.int32)), model)
    assert logits.shape == (1, 8, cfg.vocab_size)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    assert preset(name).num_params == PUBLISHED_PARAMS[name]


def test_every_parameter_has_logical_axes():
    model = nnx.eval_shape(lambda: Qwen2(preset("tiny-untied"), rngs=nnx.Rngs(0)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    specs = {
        path: tuple(v.get_value())
        for path, v in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    }
    assert len(params) == 15
    for path, variable in params.items():
        assert len(specs[path]) == variable.get_value().ndim, path
        assert all(isinstance(axis, str) for axis in specs[path]), path
    assert specs[("layers", "self_attn", "q_proj", "kernel")] == ("layers", "embed", "heads")
    assert specs[("layers", "self_attn", "k_proj", "bias")] == ("layers", "kv_heads")
    assert specs[("layers", "mlp", "down_proj", "kernel")] == ("layers", "mlp", "embed")
    assert specs[("embed_tokens", "embedding")] == ("vocab", "embed")
    assert specs[("lm_head", "kernel")] == ("embed", "vocab")


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "tiny"])
def test_hf_config_round_trip(name):
    cfg = preset(name)
    hf = Qwen2Config(**to_hf_config(cfg))
    assert from_hf_config(hf) == cfg.replace(init_std=hf.initializer_range)
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_hf_config_features_we_do_not_implement_are_rejected():
    base = to_hf_config(preset("tiny"))
    with pytest.raises(ValueError, match="use_sliding_window"):
        from_hf_config({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="rope"):
        from_hf_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({**base, "model_type": "llama"})
