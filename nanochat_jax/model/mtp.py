"""Multi-token prediction modules (docs/techniques.md#mtp): depth k predicts token t + k + 1.

"sequential" (DeepSeek-V3 §2.2): h'_k = Proj_k [RMSNorm(h_{k-1}); RMSNorm(Emb(t_{i+k}))],
h_k = Block_k(h'_k), starting from h_0 = the trunk's last hidden state.
"parallel" (Gloeckle et al. 2024): h_k = Block_k(h_0), one independent head per depth.
Both feed the shared LM head through their own RMSNorm; nothing is detached.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanochat_jax.collider import Carrier
from nanochat_jax.model.block import block_class
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.layers import bit_linear, linear_with, rms_norm


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
    """x [B, T, ...] -> y with y[:, i] = x[:, i + k], and `fill` where i + k >= T (no wrap)."""
    if k == 0:
        return x
    pad = [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x[:, k:], pad, constant_values=fill)


class MTPModule(nn.Module):
    """One MTP depth: h_k [B, T, D] for the next depth and normed h_k for the head."""

    cfg: ModelConfig  # with mhc_streams = 0: MTP blocks use the plain residual

    @nn.compact
    def __call__(self, h_prev: jax.Array, next_embed: jax.Array | None = None,
                 carrier: Carrier | None = None, kv: tuple[jax.Array, jax.Array] | None = None,
                 positions: jax.Array | None = None):
        """-> (h_k, RMSNorm(h_k), Collider carrier passed on, the block's KV cache or None)."""
        cfg = self.cfg
        h = h_prev  # [B, T, D]
        if cfg.mtp_kind == "sequential":
            h = jnp.concatenate([rms_norm(cfg, "hidden_norm")(h_prev),
                                 rms_norm(cfg, "embed_norm")(next_embed)],
                                axis=-1)  # [B, T, 2D]
            h, carrier = linear_with(bit_linear(cfg, cfg.d_model, "proj"), h, carrier)  # [B, T, D]
        h, _, carrier, kv = block_class(cfg)(cfg, name="block")(h, carrier, kv, positions)
        return h, rms_norm(cfg, "out_norm")(h), carrier, kv
