"""The Qwen2 decoder: scanned decoder layers, final norm, (tied) lm_head, chunked loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from infir2_jax.fp8.recipes import Gemm
from infir2_jax.model.attention import Attention
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.layers import BF16, Embedding, Linear, RMSNorm
from infir2_jax.model.loss import chunked_cross_entropy
from infir2_jax.model.mlp import MLP
from infir2_jax.model.rope import rope_tables

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(·)). Names mirror HF's."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, gemm: Gemm):
        norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, rngs=rngs, gemm=gemm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs, gemm=gemm)

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        segment_ids: jax.Array,
        fp8_enabled: jax.Array | None = None,
    ) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), rope, segment_ids, fp8_enabled)
        return x + self.mlp(self.post_attention_layernorm(x), fp8_enabled)


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. `m(input_ids) -> logits` [batch, seq, vocab] in FP32.

    Decoder layers are created with `nnx.vmap` (parameters stacked on a leading "layers" axis)
    and applied with `lax.scan`, so compile time does not grow with depth.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        gemm: Gemm = BF16,
    ):
        """`gemm`: the matmul policy of the seven projections of every decoder layer (an FP8
        recipe from `infir2_jax.fp8.make_gemm`); embedding and lm_head always stay BF16."""
        self.config = cfg
        self.fp8_layer_mask = gemm.layer_mask(cfg.num_layers)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            init_std=cfg.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs, gemm=gemm)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                init_std=cfg.init_std,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [batch, seq, embed].

        positions: [batch, seq] RoPE positions (restart at 0 for each packed document);
        segment_ids: [batch, seq] document ids, tokens attend only within their document.
        Both default to a single unpacked sequence.
        """
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        x = self.embed_tokens(input_ids)  # [batch, seq, embed]

        graphdef, stacked = nnx.split(self.layers)

        def apply_layer(x: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
            layer_state, fp8_enabled = xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, rope, segment_ids, fp8_enabled), None

        if cfg.remat != "none":
            apply_layer = jax.checkpoint(apply_layer, policy=_REMAT_POLICIES[cfg.remat])
        mask = self.fp8_layer_mask
        x, _ = jax.lax.scan(apply_layer, x, (stacked, None if mask is None else jnp.asarray(mask)))
        return self.norm(x)

    def unembedding(self) -> jax.Array:
        """The lm_head as an [embed, vocab] matrix (the embedding table transposed if tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        h = self.hidden_states(input_ids, positions, segment_ids)
        w = self.unembedding().astype(h.dtype)
        return jnp.einsum("bte,ev->btv", h, w, preferred_element_type=jnp.float32)

    def loss(
        self,
        input_ids: jax.Array,
        labels: jax.Array,
        loss_mask: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(summed next-token cross-entropy, token count) via the chunked loss."""
        h = self.hidden_states(input_ids, positions, segment_ids)
        return chunked_cross_entropy(
            h, self.unembedding(), labels, loss_mask, chunk_size=self.config.loss_chunk_size
        )
