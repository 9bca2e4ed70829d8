"""The Qwen2 decoder: scanned decoder layers, final norm, (tied) lm_head, chunked loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infir2_jax.fp8.base import FP8_SCALE
from infir2_jax.model.attention import Attention
from infir2_jax.model.config import ModelConfig
from infir2_jax.model.execution import ExecutionPlan, resolve_plan
from infir2_jax.model.kv_cache import KVCache
from infir2_jax.model.layers import Embedding, Linear, RMSNorm
from infir2_jax.model.loss import chunked_cross_entropy, token_logprobs
from infir2_jax.model.mlp import MLP
from infir2_jax.model.rope import rope_tables
from infir2_jax.parallel.context import load_balanced_order
from infir2_jax.parallel.rules import constrain

# Each policy also keeps the per-tensor FP8 scales (scalars; BF16 has none), so the
# recomputed forward pass does not take their amaxes again.
_KEEP_SCALES = jax.checkpoint_policies.save_only_these_names(FP8_SCALE)
_REMAT_POLICIES = {
    "full": _KEEP_SCALES,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _KEEP_SCALES
    ),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_SCALES
    ),
}


# The residual stream between blocks: split over the sequence under sequence parallelism.
RESIDUAL = ("batch", "seq", None)


def _context_order(plan: ExecutionPlan, seq_len: int) -> np.ndarray | None:
    """The load-balanced token order under context parallelism, else None."""
    if plan.context == 1:
        return None
    return load_balanced_order(seq_len, plan.context)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(·)). Names mirror HF's."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        plan: ExecutionPlan,
        fp8_switch: jax.Array | None = None,
    ):
        """`fp8_switch`: whether this layer's projections run the FP8 recipe (None: they do,
        and no layer is BF16)."""
        norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, rngs=rngs, plan=plan, fp8_switch=fp8_switch)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs, gemm=plan.gemm, fp8_switch=fp8_switch)

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        token_index: jax.Array,
        segment_ids: jax.Array,
    ) -> jax.Array:
        return self.prefill(x, rope, token_index, segment_ids)[0]

    def prefill(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        token_index: jax.Array,
        segment_ids: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(output, k, v): the block plus its attention's keys and values for a KV cache."""
        normed = self.input_layernorm(x)
        attn, k, v = self.self_attn.forward(normed, rope, token_index, segment_ids)
        return self._residual_mlp(x, attn), k, v

    def decode(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        cached_k: jax.Array,
        cached_v: jax.Array,
        positions: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block for one new token per slot (x [slots, 1, embed]) against this layer's
        cache; returns (output, k, v) of the new token (see `Attention.decode`)."""
        normed = self.input_layernorm(x)
        attn, k, v = self.self_attn.decode(normed, rope, cached_k, cached_v, positions)
        return self._residual_mlp(x, attn), k, v

    def _residual_mlp(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        x = constrain(x + attn, RESIDUAL)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), RESIDUAL)


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
        plan: ExecutionPlan | None = None,
    ):
        """`plan`: how the model runs (model/execution.py: layout, target, attention, and the
        matmul policy of the seven projections of every decoder layer — an FP8 recipe from
        `infir2_jax.fp8.make_gemm`; embedding and lm_head always stay BF16). Default: one
        device of this process, BF16, the default `ExecutionConfig`."""
        self.config = cfg
        self.plan = plan = resolve_plan(cfg) if plan is None else plan
        mask = plan.gemm.layer_mask(cfg.num_layers)
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
        def make_layers(rngs: nnx.Rngs, switch: jax.Array | None) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs, plan=plan, fp8_switch=switch)

        self.layers = make_layers(rngs, None if mask is None else jnp.asarray(mask))
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
        Both default to a single unpacked sequence. Under context parallelism the rows come
        back in the load-balanced order (see `parallel/context.py`); `__call__` and `loss`
        handle that.
        """
        cfg = self.config
        seq_len = input_ids.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq_len), input_ids.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        order = _context_order(self.plan, seq_len)
        token_index = jnp.arange(seq_len, dtype=jnp.int32)
        if order is not None:
            input_ids, positions, segment_ids = (
                jnp.take(a, order, axis=1) for a in (input_ids, positions, segment_ids)
            )
            token_index = jnp.asarray(order, jnp.int32)
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, jnp.dtype(cfg.dtype))
        x = constrain(self.embed_tokens(input_ids), RESIDUAL)  # [batch, seq, embed]

        def apply_layer(layer, x, index):
            return layer(x, rope, token_index, segment_ids), None

        x, _ = self._scan_layers(apply_layer, x, remat=self.plan.execution.remat != "none")
        return self.norm(x)

    def _scan_layers(self, step, carry, *, remat: bool = False):
        """`lax.scan` of `step(layer, carry, index) -> (carry, y)` over the stacked decoder
        layers (each with its own slice of every stacked variable, FP8 switches included),
        `index` its position in the stack. `remat` applies `execution.remat` to each step."""
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, xs):
            layer_state, index = xs
            return step(nnx.merge(graphdef, layer_state), carry, index)

        if remat:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.plan.execution.remat])
        return jax.lax.scan(body, carry, (stacked, jnp.arange(self.config.num_layers)))

    def prefill(
        self, input_ids: jax.Array, lengths: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The prompts of a generation batch, input_ids [batch, prompt] right-padded to
        `lengths` [batch]. Returns the FP32 logits of each row's last prompt token [batch,
        vocab] (the next token's distribution) and every layer's keys and values [layers,
        batch, prompt, kv_heads, head_dim] for `KVCache.insert`."""
        cfg = self.config
        batch, length = input_ids.shape
        token_index = jnp.arange(length, dtype=jnp.int32)
        positions = jnp.broadcast_to(token_index, input_ids.shape)
        # Padding is segment 0: it never attends to (or is attended by) the prompt.
        segment_ids = (token_index[None, :] < lengths[:, None]).astype(jnp.int32)
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, jnp.dtype(cfg.dtype))
        x = constrain(self.embed_tokens(input_ids), RESIDUAL)

        def apply_layer(layer, x, index):
            x, k, v = layer.prefill(x, rope, token_index, segment_ids)
            return x, (k, v)

        x, (k, v) = self._scan_layers(apply_layer, x)
        last = jnp.take_along_axis(self.norm(x), (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(last), k, v

    def decode(
        self, cache: KVCache, tokens: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        """One decoding step: `tokens` [slots] at `positions` [slots] (each slot's current
        length) enter the cache; returns the FP32 logits of the next token [slots, vocab] and
        the updated cache."""
        cfg = self.config
        rope = rope_tables(positions[:, None], cfg.head_dim, cfg.rope_theta, jnp.dtype(cfg.dtype))
        x = constrain(self.embed_tokens(tokens[:, None]), RESIDUAL)  # [slots, 1, embed]

        def apply_layer(layer, x, index):
            # Each layer reads its cache slice only; the new k/v leave the scan as outputs
            # and enter the cache in one in-place scatter below.
            cached_k, cached_v = cache.k[index], cache.v[index]
            x, k, v = layer.decode(x, rope, cached_k, cached_v, positions)
            return x, (k[:, 0], v[:, 0])

        x, (k, v) = self._scan_layers(apply_layer, x)
        return self.logits(self.norm(x)[:, 0]), cache.append(positions, k, v)

    def unembedding(self) -> jax.Array:
        """The lm_head as an [embed, vocab] matrix (the embedding table transposed if tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, h: jax.Array) -> jax.Array:
        """FP32 logits [..., vocab] of final-normed hidden states [..., embed]."""
        w = self.unembedding().astype(h.dtype)
        return jnp.einsum("...e,ev->...v", h, w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        logits = self.logits(self.hidden_states(input_ids, positions, segment_ids))
        order = _context_order(self.plan, input_ids.shape[1])
        if order is not None:  # back to the original token order
            logits = jnp.take(logits, np.argsort(order), axis=1)
        return logits

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
        order = _context_order(self.plan, input_ids.shape[1])
        if order is not None:  # the loss is a sum over tokens: permute targets like the rows
            labels, loss_mask = (jnp.take(a, order, axis=1) for a in (labels, loss_mask))
        return chunked_cross_entropy(
            h, self.unembedding(), labels, loss_mask, chunk_size=self.plan.execution.loss_chunk_size
        )

    def token_logprobs(
        self,
        input_ids: jax.Array,
        targets: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """log p(target) [batch, seq] under softmax(logits / temperature) at every position
        (and the entropy if `with_entropy`), via the chunked, vocab-parallel computation of the
        loss: what an RL objective needs, without [tokens, vocab] logits."""
        h = self.hidden_states(input_ids, positions, segment_ids)
        order = _context_order(self.plan, input_ids.shape[1])
        if order is not None:
            targets = jnp.take(targets, order, axis=1)
        logprobs, entropy = token_logprobs(
            h, self.unembedding(), targets, chunk_size=self.plan.execution.loss_chunk_size,
            temperature=temperature, with_entropy=with_entropy,
        )  # fmt: skip
        if order is not None:  # back to the original token order
            inverse = np.argsort(order)
            logprobs = jnp.take(logprobs, inverse, axis=1)
            entropy = None if entropy is None else jnp.take(entropy, inverse, axis=1)
        return logprobs, entropy
