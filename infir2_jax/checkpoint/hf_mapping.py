"""The one table mapping Hugging Face Qwen2 tensor names to our parameter tree.

Both conversion directions (HF -> ours in `hf_io.read_hf_params`, ours -> HF in
`hf_io.write_hf_checkpoint`) derive from `RULES`; nothing else knows HF names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from infir2_jax.model.config import ModelConfig
from infir2_jax.model.transformer import Qwen2

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_name: str  # "{layer}" marks a per-layer tensor, stacked on our leading "layers" axis
    path: ParamPath  # where it lives in our parameter tree
    transpose: bool = False  # HF nn.Linear stores [out, in]; our kernels are [in, out]
    when: Callable[[ModelConfig], bool] = lambda cfg: True

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_names(self, cfg: ModelConfig) -> list[str]:
        if self.per_layer:
            return [self.hf_name.format(layer=i) for i in range(cfg.num_layers)]
        return [self.hf_name]


def _layer(hf: str, *path: str, transpose: bool = False) -> TensorRule:
    return TensorRule(f"model.layers.{{layer}}.{hf}", ("layers", *path), transpose)


RULES: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", ("embed_tokens", "embedding")),
    _layer("input_layernorm.weight", "input_layernorm", "scale"),
    _layer("self_attn.q_proj.weight", "self_attn", "q_proj", "kernel", transpose=True),
    _layer("self_attn.q_proj.bias", "self_attn", "q_proj", "bias"),
    _layer("self_attn.k_proj.weight", "self_attn", "k_proj", "kernel", transpose=True),
    _layer("self_attn.k_proj.bias", "self_attn", "k_proj", "bias"),
    _layer("self_attn.v_proj.weight", "self_attn", "v_proj", "kernel", transpose=True),
    _layer("self_attn.v_proj.bias", "self_attn", "v_proj", "bias"),
    _layer("self_attn.o_proj.weight", "self_attn", "o_proj", "kernel", transpose=True),
    _layer("post_attention_layernorm.weight", "post_attention_layernorm", "scale"),
    _layer("mlp.gate_proj.weight", "mlp", "gate_proj", "kernel", transpose=True),
    _layer("mlp.up_proj.weight", "mlp", "up_proj", "kernel", transpose=True),
    _layer("mlp.down_proj.weight", "mlp", "down_proj", "kernel", transpose=True),
    TensorRule("model.norm.weight", ("norm", "scale")),
    TensorRule(
        "lm_head.weight",
        ("lm_head", "kernel"),
        transpose=True,
        when=lambda cfg: not cfg.tie_embeddings,
    ),
)

# Tensors some HF checkpoints carry that hold no parameters of ours.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def active_rules(cfg: ModelConfig) -> list[TensorRule]:
    return [r for r in RULES if r.when(cfg)]


def param_shapes(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter path of the model and its shape (no allocation)."""
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {tuple(str(k) for k in path): tuple(v.shape) for path, v in flat}


def hf_shape(rule: TensorRule, ours: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one HF tensor of `rule`, given the shape of our (possibly stacked) parameter."""
    shape = ours[1:] if rule.per_layer else ours
    return shape[::-1] if rule.transpose else shape


def check_rules_cover_model(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """The table maps every parameter exactly once (a model/table mismatch is a bug here)."""
    shapes = param_shapes(cfg)
    mapped = [r.path for r in active_rules(cfg)]
    if sorted(mapped) != sorted(shapes):
        raise AssertionError(
            f"HF mapping table out of sync with the model: unmapped {set(shapes) - set(mapped)}, "
            f"unknown {set(mapped) - set(shapes)}"
        )
    return shapes


def to_hf_tensors(
    params: Mapping[ParamPath, Any], cfg: ModelConfig, dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) one tensor at a time from our flat parameter dict."""
    for rule in active_rules(cfg):
        value = params[rule.path]
        for i, name in enumerate(rule.hf_names(cfg)):
            tensor = np.asarray(jax.device_get(value[i] if rule.per_layer else value))
            if rule.transpose:
                tensor = tensor.T
            yield name, np.ascontiguousarray(tensor.astype(dtype))
