"""Qwen2 architecture configuration, named presets and the Hugging Face config bridge."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

# Fields that fix the parameter shapes (the rest are numerics and execution choices).
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_embeddings",
)
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Qwen2-architecture decoder (HF `Qwen2ForCausalLM`); how it
    runs is `ExecutionConfig`'s."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    # Numerics: parameters are stored in `param_dtype` (FP32 master weights); matmuls,
    # activations and residuals run in `dtype`. Norm statistics, RoPE tables, softmax and the
    # loss are always FP32, as in HF.
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError("model.num_heads, num_kv_heads and head_dim must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of "
                f"model.num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name} must be float32, bfloat16 or float16: {value!r}")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def architecture_mismatch(self, other: ModelConfig) -> str | None:
        """The first field that makes `other`'s weights unusable here, or None."""
        for name in ARCHITECTURE_FIELDS:
            if getattr(self, name) != getattr(other, name):
                return name
        return None

    @property
    def num_params(self) -> int:
        """Exact parameter count (HF counts a tied lm_head once)."""
        d, f, h, kv, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd + h * hd + 2 * (d * kv * hd + kv * hd) + h * hd * d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), causal attention.

        6 x (every matmul weight, lm_head included, embedding lookup excluded)
        + 6 x layers x heads x head_dim x seq_len (QK^T and AV, halved for causality).
        """
        embedding_tables = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        matmul_weights = self.num_params - embedding_tables + self.vocab_size * self.hidden_size
        attention = 6 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6.0 * matmul_weights + attention


# Execution choices that old model configs (checkpoint metadata, run directories) still carry
# under `model`: dropped when such a config is read, an error naming the new key in a config.
EXECUTION_FIELDS = (
    "remat",
    "loss_chunk_size",
    "attention_impl",
    "attention_chunk_size",
    "max_segments",
    "attention_block",
)


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How a model runs, not what it computes: recomputation, chunk sizes, the attention
    kernel (`execution.*`). Resolved with the devices into an `ExecutionPlan`
    (model/execution.py)."""

    # What the backward pass recomputes instead of storing, per scanned decoder layer (every
    # policy keeps the per-tensor FP8 scales: scalars, model/transformer.py).
    remat: RematPolicy = "full"
    # One device's tokens per chunk of the cross-entropy: [chunk, vocab] FP32 logits exist at
    # a time on each device.
    loss_chunk_size: int = 2048
    # Which attention runs (model/attention_impl.py):
    # "auto": "cudnn" where it runs (a Hopper GPU, no context parallelism), else "pallas" on a
    # CUDA GPU, else "chunked".
    # "cudnn": cuDNN flash attention for packed rows (kernels/cudnn_attention.py): no
    # [seq, seq] buffer; at most `max_segments` segments (documents, padding) per row (a batch
    # with more runs through "pallas" instead: `ExecutionPlan.fallback`). JAX's
    # binding keeps FP32 softmax statistics of [batch·max_segments, heads, seq] per layer, so
    # each segment of headroom costs 4·heads·seq bytes per row and layer.
    # "pallas": our Pallas flash attention (kernels/flash_attention.py), `attention_block`
    # query/key tiles; any CUDA GPU and context parallelism; interpreted (slow) on the CPU.
    # "chunked": XLA attention `attention_chunk_size` queries at a time under remat, so a
    # 32k-token row never holds [seq, seq] scores (any platform, any parallelism).
    # "xla" / None: one jax.nn.dot_product_attention call with an explicit [seq, seq] mask.
    attention_impl: Literal["auto", "xla", "cudnn", "pallas", "chunked"] | None = None
    attention_chunk_size: int = 1024
    max_segments: int = 32
    attention_block: int = 128

    def __post_init__(self) -> None:
        if self.loss_chunk_size <= 0:
            raise ValueError("execution.loss_chunk_size must be positive")
        if self.attention_chunk_size <= 0:
            raise ValueError("execution.attention_chunk_size must be positive")
        if self.max_segments <= 0:
            raise ValueError("execution.max_segments must be positive")
        if self.attention_block < 16 or self.attention_block & (self.attention_block - 1):
            raise ValueError(
                "execution.attention_block must be a power of two >= 16, got "
                f"{self.attention_block}"
            )

    def replace(self, **changes: Any) -> ExecutionConfig:
        return dataclasses.replace(self, **changes)


def drop_execution_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A stored model config without the execution keys configs held before `execution`."""
    return {k: v for k, v in fields.items() if k not in EXECUTION_FIELDS}


def _qwen25(
    hidden: int, ffn: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, **kw: Any
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        tie_embeddings=tied,
        init_std=0.02,
        **kw,
    )


# Shapes from the published Qwen/Qwen2.5-* config.json files.
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, 151936, True, max_position_embeddings=131072),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, 152064, False, max_position_embeddings=131072),
    "qwen2.5-14b": _qwen25(
        5120, 13824, 48, 40, 8, 152064, False, rms_norm_eps=1e-5, max_position_embeddings=131072
    ),
    "qwen2.5-32b": _qwen25(
        5120, 27648, 64, 40, 8, 152064, False, rms_norm_eps=1e-5, max_position_embeddings=131072
    ),
    "qwen2.5-72b": _qwen25(
        8192, 29568, 80, 64, 8, 152064, False, rms_norm_eps=1e-5, max_position_embeddings=131072
    ),
    # Test and CPU-demo sizes: same architecture, a few million parameters or fewer.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        tie_embeddings=True,
        rope_theta=10_000.0,
        max_position_embeddings=1024,
    ),
    "tiny-untied": ModelConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=200,
        num_layers=2,
        num_heads=3,
        num_kv_heads=1,
        head_dim=32,
        tie_embeddings=False,
        rope_theta=10_000.0,
        max_position_embeddings=1024,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


def from_hf_config(hf: Mapping[str, Any] | Any, **overrides: Any) -> ModelConfig:
    """Builds a ModelConfig from a HF Qwen2 config (a `PretrainedConfig` or config.json dict)."""
    d = dict(hf if isinstance(hf, Mapping) else hf.to_dict())
    model_type = d.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ValueError(f"config.json: model_type {model_type!r} is not supported (need 'qwen2')")
    if d.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported")
    rope = d.get("rope_parameters") or {}
    if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError("config.json: RoPE scaling (rope_scaling / rope_type) is not supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 10_000.0))
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        if k not in d
    ]
    if missing:
        raise ValueError(f"config.json: missing keys {missing}")
    heads = d.get("num_attention_heads", 32)
    fields = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope_theta=float(theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        init_std=d.get("initializer_range", 0.02),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The config.json dict of the equivalent HF `Qwen2ForCausalLM`."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
