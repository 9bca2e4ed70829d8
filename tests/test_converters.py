"""HF <-> Orbax converters: bit-exact round trip, transformers loads the output, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, make_hf_model
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

from infir2_jax.checkpoint import CheckpointError, read_hf_config, read_hf_params
from infir2_jax.checkpoint.hf_io import hf_weight_map


def _tensors(hf_dir) -> dict[str, np.ndarray]:
    out = {}
    for name, file in hf_weight_map(hf_dir).items():
        with safe_open(file, framework="numpy") as f:
            out[name] = f.get_tensor(name)
    return out


def _convert(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "converters" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        umask=0o022,
    )


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact_in_float32(tmp_path, tied):
    make_hf_model(tmp_path / "hf", tie_word_embeddings=tied, num_hidden_layers=3)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # copied verbatim by --tokenizer-dir
    r = _convert("hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ob"))
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr, r.stderr  # no spurious absl/Orbax warnings
    r = _convert(
        "orbax_to_hf.py",
        "--checkpoint", str(tmp_path / "ob"),
        "--out", str(tmp_path / "hf2"),
        "--dtype", "auto",  # as stored: float32
        "--tokenizer-dir", str(tmp_path / "hf"),
        "--max-shard-gb", "0.0001",  # ~100 KB shards: exercises the sharded index
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr and "note:" not in r.stdout, (r.stdout, r.stderr)
    for out in ("ob", "hf2"):  # ordinary directories, not mkdtemp's private 0700
        assert (tmp_path / out).stat().st_mode & 0o777 == 0o755

    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "hf2")
    assert sorted(original) == sorted(back)
    for name in original:
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], original[name], err_msg=name)
    index = json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    assert reloaded.config.tie_word_embeddings == tied


def test_bfloat16_export_loads_in_transformers(tmp_path):
    hf = make_hf_model(tmp_path / "hf")
    assert (
        _convert(
            "hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ob")
        ).returncode
        == 0
    )
    r = _convert(
        "orbax_to_hf.py", "--checkpoint", str(tmp_path / "ob"), "--out", str(tmp_path / "bf")
    )
    assert r.returncode == 0, r.stderr
    # The default is bfloat16, said when the checkpoint stores something else.
    assert "note: the checkpoint stores float32; writing bfloat16" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf")
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids).logits.float()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_missing_hf_file_is_named(tmp_path):
    make_hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    r = _convert("hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ob"))
    assert r.returncode != 0
    assert "model.safetensors" in r.stderr
    assert not (tmp_path / "ob").exists()

    (tmp_path / "hf" / "config.json").unlink()
    r = _convert("hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ob"))
    assert r.returncode != 0 and "config.json" in r.stderr


def test_wrong_shape_tensor_is_named_and_nothing_is_written(tmp_path):
    make_hf_model(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = _tensors(tmp_path / "hf")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((99, 60), np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    r = _convert("hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ob"))
    assert r.returncode != 0
    assert "model.layers.1.mlp.up_proj.weight" in r.stderr and "(99, 60)" in r.stderr
    assert not (tmp_path / "ob").exists()


@pytest.mark.parametrize("script", ["hf_to_orbax.py", "hf_to_fp8.py"])
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda shape: np.zeros(shape, np.int32), "is stored as I32"),
        (lambda shape: np.full(shape, np.nan, np.float32), f"{120 * 60:,} non-finite values"),
    ],
)
def test_non_float_or_non_finite_tensor_is_refused_by_name(tmp_path, script, bad, message):
    make_hf_model(tmp_path / "hf")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = _tensors(tmp_path / "hf")
    tensors[name] = bad(tensors[name].shape)  # [heads × head_dim, hidden] = [120, 60]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    r = _convert(script, "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert name in r.stderr and message in r.stderr
    assert not (tmp_path / "out").exists()


def test_shard_index_outside_the_model_directory_is_refused(tmp_path):
    make_hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    names = _tensors_of(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": dict.fromkeys(names, "../elsewhere.safetensors")}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        hf_weight_map(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        hf_weight_map(tmp_path / "hf")


def _tensors_of(file) -> list[str]:
    with safe_open(file, framework="numpy") as f:
        return list(f.keys())


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    make_hf_model(tmp_path / "hf")
    cfg = read_hf_config(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="model.layers.1.* not in a Qwen2 model"):
        read_hf_params(tmp_path / "hf", cfg.replace(num_layers=1))

    tensors = _tensors(tmp_path / "hf")
    del tensors["model.layers.0.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing.*model.layers.0.self_attn.k_proj.bias"):
        read_hf_params(tmp_path / "hf", cfg)


def test_orbax_checkpoint_with_wrong_shape_is_named(tmp_path):
    make_hf_model(tmp_path / "hf")
    assert (
        _convert(
            "hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ob")
        ).returncode
        == 0
    )
    # Corrupt the stored model config so it disagrees with the stored tensors.
    config_file = next((tmp_path / "ob" / "model_config").glob("*"))
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 128
    config_file.write_text(json.dumps(config))
    r = _convert(
        "orbax_to_hf.py", "--checkpoint", str(tmp_path / "ob"), "--out", str(tmp_path / "o")
    )
    assert r.returncode != 0
    assert "layers/mlp/down_proj/kernel" in r.stderr and "(2, 100, 60)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_is_never_overwritten(tmp_path):
    make_hf_model(tmp_path / "hf")
    (tmp_path / "ob").mkdir()
    (tmp_path / "ob" / "keep.txt").write_text("precious")
    r = _convert("hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ob"))
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr
    assert (tmp_path / "ob" / "keep.txt").read_text() == "precious"
    assert (
        _convert(
            "hf_to_orbax.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o2")
        ).returncode
        == 0
    )
    (tmp_path / "hf_out").mkdir()
    (tmp_path / "hf_out" / "x").write_text("1")
    r = _convert(
        "orbax_to_hf.py", "--checkpoint", str(tmp_path / "o2"), "--out", str(tmp_path / "hf_out")
    )
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr
    assert sorted(p.name for p in (tmp_path / "hf_out").iterdir()) == ["x"]
