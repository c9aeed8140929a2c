"""The transformer block: BitNet b1.58 2B4T layout, optionally on an mHC residual stream."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.hyper import HyperMaps, hyper_residual
from nanochat_jax.model.layers import Attention, FeedForward


class Block(nn.Module):
    """h = x + Attn(attn_norm(x)); out = h + FFN(ffn_norm(h)).

    With `cfg.mhc_streams = n > 0` the stream is x: [B, T, n, D] and each residual add is
    an mHC connection (model/hyper.py); the call then also returns this block's two H_res
    maps [2, B, T, n, n] (attention's, FFN's), else None.
    """

    cfg: ModelConfig
    index: int = 0  # depth of the block: the mHC maps of sub-layer j first read stream j mod n

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        c = self.cfg
        norm = lambda name: nn.RMSNorm(epsilon=c.norm_eps, name=name)
        attn = lambda h: Attention(c, name="attn")(norm("attn_norm")(h))
        ffn = lambda h: FeedForward(c, name="ffn")(norm("ffn_norm")(h))
        if not c.mhc_streams:  # x: [B, T, D]
            x = x + attn(x)
            return x + ffn(x), None
        res_maps = []
        for j, (name, sublayer) in enumerate((("attn", attn), ("ffn", ffn))):
            maps = HyperMaps(c.mhc_streams, 2 * self.index + j, c.mhc_sinkhorn_iters,
                             c.mhc_dynamic, norm_eps=c.norm_eps, name=f"hyper_{name}")(x)
            x = hyper_residual(x, sublayer, *maps)
            res_maps.append(maps[2])
        return x, jnp.stack(res_maps)
