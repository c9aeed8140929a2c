"""The transformer block: BitNet b1.58 2B4T layout, optionally on an mHC residual stream."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanochat_jax.collider import Carrier
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.hyper import HyperMaps, hyper_read, hyper_write
from nanochat_jax.model.layers import Attention, FeedForward, rms_norm
from nanochat_jax.model.params import STACK


class Block(nn.Module):
    """h = x + Attn(attn_norm(x)); out = h + FFN(ffn_norm(h)).

    With `cfg.mhc_streams = n > 0` the stream is x: [B, T, n, D] and each residual add is
    an mHC connection (model/hyper.py); the call then also returns this block's two H_res
    maps [2, B, T, n, n] (attention's, FFN's), else None. A Collider carrier, when given,
    is threaded through every BitLinear (nanochat_jax/collider.py).
    """

    cfg: ModelConfig
    index: int = 0  # depth of the block: the mHC maps of sub-layer j first read stream j mod n

    @nn.compact
    def __call__(self, x: jax.Array, carrier: Carrier | None = None,
                 kv: tuple[jax.Array, jax.Array] | None = None,
                 positions: jax.Array | None = None, index: jax.Array | None = None):
        """x -> (x, H_res maps or None, Collider carrier passed on, attention's updated KV
        cache or None); `kv` and `positions` as in layers.Attention; `index` (traced, under
        `nn.scan`) replaces the static `self.index`."""
        cfg = self.cfg
        depth = self.index if index is None else index

        def norm(name):
            return rms_norm(cfg, name)

        def attn(h, cr):
            nonlocal kv
            out, cr, kv = Attention(cfg, name="attn")(norm("attn_norm")(h), cr, kv, positions)
            return out, cr

        sublayers = (("attn", attn),
                     ("ffn", lambda h, cr: FeedForward(cfg, name="ffn")(norm("ffn_norm")(h), cr)))
        if not cfg.mhc_streams:  # x: [B, T, D]
            for _, sublayer in sublayers:
                y, carrier = sublayer(x, carrier)
                x = x + y
            return x, None, carrier, kv
        res_maps = []
        for j, (name, sublayer) in enumerate(sublayers):
            h_pre, h_post, h_res = HyperMaps(
                cfg.mhc_streams, cfg.mhc_sinkhorn_iters, cfg.mhc_dynamic, norm_eps=cfg.norm_eps,
                name=f"hyper_{name}")(x, 2 * depth + j)
            y, carrier = sublayer(hyper_read(x, h_pre), carrier)
            x = hyper_write(x, y, h_post, h_res)
            res_maps.append(h_res)
        return x, jnp.stack(res_maps), carrier, kv


REMAT = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def block_class(cfg: ModelConfig) -> type[Block]:
    """Block, or Block under `nn.remat` with the config's policy (activations recomputed in
    the backward pass instead of stored)."""
    if cfg.remat in ("none", "loop"):  # "loop": Transformer remats whole stack passes
        return Block
    return nn.remat(Block, policy=REMAT[cfg.remat])


class _ScanStep(nn.Module):
    """One block as a step of `nn.scan`: carry (x, Collider carrier), scanned input the
    block's depth (mHC's maps read by depth) -> (carry, H_res maps [2, B, T, n, n] or None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, index: jax.Array):
        x, carrier = carry
        x, res, carrier, _ = Block(self.cfg, name="block")(x, carrier, index=index)
        return (x, carrier), res


def scanned_blocks(cfg: ModelConfig) -> nn.Module:
    """The whole block stack as one `nn.scan` over depth (`cfg.scan_layers`): parameters
    stacked with a leading [n_layers] axis, one block body traced whatever the depth.
    Call it as `(x, carrier), maps = stack((x, carrier), jnp.arange(n_layers))`; maps
    [L, 2, B, T, n, n] with mHC, else None. Remat (full / dots) wraps the step."""
    step = _ScanStep
    if cfg.remat in REMAT:
        step = nn.remat(_ScanStep, policy=REMAT[cfg.remat], prevent_cse=False)
    return nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=0, length=cfg.n_layers)(cfg, name=STACK)
