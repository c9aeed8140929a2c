"""The BitNet b1.58 decoder: pre-norm blocks, full-precision embedding and LM head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.layers import Attention, FeedForward


def path_names(path) -> tuple[str, ...]:
    """A jax.tree_util key path as plain names: ('block_0', 'attn', 'q', 'kernel')."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_block_kernel(path, leaf) -> bool:
    """True for a 2-D kernel inside a transformer block: exactly the BitLinear weights
    (not the embedding, the LM head, or a norm). `path` is a jax.tree_util key path."""
    return leaf.ndim == 2 and any(n.startswith("block_") for n in path_names(path))


class Block(nn.Module):
    """h = x + Attn(attn_norm(x)); out = h + FFN(ffn_norm(h))  (BitNet b1.58 2B4T block)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, T, D]
        eps = self.cfg.norm_eps
        x = x + Attention(self.cfg, name="attn")(nn.RMSNorm(epsilon=eps, name="attn_norm")(x))
        return x + FeedForward(self.cfg, name="ffn")(nn.RMSNorm(epsilon=eps, name="ffn_norm")(x))


class Transformer(nn.Module):
    """Decoder-only LM. `__call__` gives logits; `hidden_and_head` feeds the chunked loss.

    Params: `embed/embedding [V, D]`, `block_{i}/...`, `final_norm/scale [D]`, and
    `lm_head [D, V]` unless `tie_embeddings` (then the head is `embedding.T`).
    """

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(c.vocab_size, c.d_model,
                              embedding_init=nn.initializers.normal(c.init_std))
        self.blocks = [Block(c, name=f"block_{i}") for i in range(c.n_layers)]
        self.final_norm = nn.RMSNorm(epsilon=c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.initializers.normal(c.init_std),
                                      (c.d_model, c.vocab_size), jnp.float32)

    def hidden_and_head(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [B, T] int -> (final hidden [B, T, D], head weight [D, V])."""
        x = self.embed(tokens)  # [B, T, D]
        for block in self.blocks:
            x = block(x)
        head = self.embed.embedding.T if self.cfg.tie_embeddings else self.lm_head
        return self.final_norm(x), head

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> logits [B, T, V] (materialises all logits: use for small inputs)."""
        h, head = self.hidden_and_head(tokens)
        return jnp.dot(h, head.astype(h.dtype))
