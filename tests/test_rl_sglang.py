"""The `sglang` rollout engine against a local server speaking SGLang's native HTTP API
(tests/sglang_mock.py: `transformers` generating from the synced weight directory). Real
SGLang is CUDA-only and is not run here."""

from __future__ import annotations

import io
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model
from flax import nnx
from sglang_mock import MockSGLang, serve

from infir2_jax import from_pretrained
from infir2_jax.config import RolloutConfig
from infir2_jax.generate import SamplingParams
from infir2_jax.rl.sglang import RolloutServerError, SGLangRollout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A mock SGLang server started on a random tiny model (what the launcher starts on)."""
    initial = tmp_path_factory.mktemp("initial")
    make_hf_model(initial, seed=1)
    mock = MockSGLang(str(initial))
    httpd = serve(mock)
    yield mock, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def trainer_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trainer")
    make_hf_model(directory, seed=2)
    return from_pretrained(directory, dtype="float32")


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _trainer_logprobs(model, prompt, response, temperature):
    tokens = jnp.asarray([list(prompt) + list(response)], jnp.int32)
    logprobs, _ = model.token_logprobs(tokens[:, :-1], tokens[:, 1:], temperature=temperature)
    return np.asarray(logprobs[0, len(prompt) - 1 :])


def test_after_a_sync_the_server_samples_from_the_trainers_weights(server, trainer_model, tmp_path):
    mock, url = server
    cfg = RolloutConfig(engine="sglang", sglang_urls=(url, url), weights="fp32", keep_versions=2)
    rollout = SGLangRollout(cfg, trainer_model.config, tmp_path / "weights")
    params = _params(trainer_model)
    rollout.sync(params, 3)
    assert mock.version == "v3" and (tmp_path / "weights" / "v3" / "config.json").is_file()
    calls = mock.generate_calls
    rollout.sync(params, 3)  # the same version again: nothing exported or loaded
    prompts = [[5, 17, 42], [250, 3, 9, 11], [1]]
    sampling = SamplingParams(temperature=1.3, max_new_tokens=6, n=2, stop_token_ids=(4,))
    results = rollout.generate(prompts, sampling)
    assert mock.generate_calls == calls + 2  # one request per server
    assert [len(per) for per in results] == [2] * 3
    for i, per in enumerate(results):
        for s, c in enumerate(per):
            assert (c.index, c.sample) == (i, s)
            assert len(c.output_ids) == len(c.logprobs) >= 1
            assert c.finish_reason == ("stop" if c.output_ids[-1] == 4 else "length")
            expected = _trainer_logprobs(trainer_model, prompts[i], c.output_ids, 1.3)
            np.testing.assert_allclose(c.logprobs, expected, atol=2e-5)
    for version in (4, 5):
        rollout.sync(params, version)
    kept = sorted(p.name for p in (tmp_path / "weights").iterdir())
    assert kept == ["v4", "v5"] and mock.version == "v5"
    rollout.close()


def test_block_fp8_weights_load_and_sample_close_to_the_trainer(server, trainer_model, tmp_path):
    mock, url = server
    cfg = RolloutConfig(engine="sglang", sglang_urls=(url,), weights="fp8_block")
    rollout = SGLangRollout(cfg, trainer_model.config, tmp_path / "weights")
    rollout.sync(_params(trainer_model), 1)
    index = json.loads((tmp_path / "weights" / "v1" / "config.json").read_text())
    assert index["quantization_config"]["weight_block_size"] == [128, 128]
    (per,) = rollout.generate([[5, 17, 42]], SamplingParams(temperature=1.0, max_new_tokens=4))
    expected = _trainer_logprobs(trainer_model, [5, 17, 42], per[0].output_ids, 1.0)
    np.testing.assert_allclose(per[0].logprobs, expected, atol=0.1)  # FP8 weight error
    assert not np.allclose(per[0].logprobs, expected, atol=1e-5)  # really the FP8 weights
    rollout.close()


def test_server_errors_are_named(server, trainer_model, tmp_path):
    mock, url = server
    down = RolloutConfig(engine="sglang", sglang_urls=("http://127.0.0.1:9",), retries=0)
    with pytest.raises(RolloutServerError, match=r"127.0.0.1:9/health failed .* Is it running"):
        SGLangRollout(down, trainer_model.config, tmp_path / "w")
    cfg = RolloutConfig(engine="sglang", sglang_urls=(url,), retries=0)
    rollout = SGLangRollout(cfg, trainer_model.config, tmp_path / "w")
    with pytest.raises(RolloutServerError, match="did not load"):
        rollout._load(tmp_path / "missing", 9)
    with pytest.raises(RolloutServerError, match="HTTP 400.*top-p"):
        rollout.generate([[1, 2]], SamplingParams(top_p=0.5))


def test_rl_run_with_sglang_rollouts(server, tmp_path):
    """Two RL steps of the whole loop on the mock server: weights synced every step, the
    server's logprobs agree with the trainer's (FP32 export), old versions pruned."""
    from test_rl_loop import _config

    from infir2_jax.rl.loop import run

    mock, url = server
    cfg = _config(
        tmp_path / "run", 2,
        **{"rl.rollout.engine": "sglang", "rl.rollout.sglang_urls": f"[{url}]",
           "rl.rollout.weights": "fp32", "rl.rollout.keep_versions": 1,
           "rl.prompts_per_step": 4, "rl.n": 2},
    )  # fmt: skip
    history = run(cfg, out=io.StringIO())
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert h["logprob_mismatch"] < 1e-4, h
        assert 0.99 < h["tis_weight_mean"] < 1.01
    assert mock.version == "v1"  # synced before step 2's rollouts
    assert sorted(p.name for p in (tmp_path / "run" / "rollout_weights").iterdir()) == ["v1"]
