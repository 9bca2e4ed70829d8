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


def test_model_configs_stored_before_the_execution_section_still_load():
    """Checkpoints written when `model` also held the execution choices (remat, attention
    kernel, chunk sizes) load: those keys are dropped; unknown keys are still an error."""
    import dataclasses

    from infir2_jax.checkpoint import CheckpointError
    from infir2_jax.checkpoint.orbax_io import model_config_from_json

    cfg = preset("tiny")
    old = {
        **dataclasses.asdict(cfg), "remat": "full", "loss_chunk_size": 2048,
        "attention_impl": None, "attention_chunk_size": 1024, "max_segments": 32,
        "attention_block": 128,
    }  # fmt: skip
    assert model_config_from_json(old, "old") == cfg
    with pytest.raises(CheckpointError, match="bogus"):
        model_config_from_json({**old, "bogus": 1}, "old")


def test_the_fp8_switch_is_a_layer_variable_outside_the_saved_state():
    """With BF16 layers, each projection holds its layer's switch, stacked like its kernel;
    the parameters and FP8 state (what checkpoints hold) keep exactly their keys."""
    import numpy as np

    from infir2_jax.config import FP8Config
    from infir2_jax.fp8 import Fp8State, make_gemm
    from infir2_jax.model import resolve_plan
    from infir2_jax.model.parts import split_model

    cfg = preset("tiny")
    gemm = make_gemm(FP8Config(recipe="delayed", bf16_layers=(0, -1)))
    parts = split_model(cfg, resolve_plan(cfg, gemm=gemm))
    switch = parts.switches["layers"]["self_attn"]["q_proj"]["fp8_switch"]
    np.testing.assert_array_equal(switch, [False, True, True, False])
    plain = split_model(cfg, resolve_plan(cfg, gemm=make_gemm(FP8Config(recipe="delayed"))))
    assert plain.switches == {}
    for a, b in ((parts.params, plain.params), (parts.fp8, plain.fp8)):
        assert jax.tree.structure(a) == jax.tree.structure(b)
    assert set(parts.fp8["layers"]["mlp"]["up_proj"]) == {"fp8_history"}
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), plan=parts.plan))
    assert set(nnx.to_pure_dict(nnx.state(model, Fp8State))["layers"]["self_attn"]["q_proj"]) == {
        "fp8_history"
    }
