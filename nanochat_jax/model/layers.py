"""Building blocks of the BitNet b1.58 decoder: BitLinear, rotary embeddings, attention, FFN.

Layout: kernels are `[in, out]` (Flax). Every BitLinear in the block is preceded by exactly
one RMSNorm (pre-norm or sub-norm): the `x~ = RMSNorm(x)` of docs/techniques.md#bitnet; BitLinear
itself only quantises.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanochat_jax import collider
from nanochat_jax.errors import ConfigError
from nanochat_jax.model.axes import kernel_layout
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.kv_cache import write_slots
from nanochat_jax.ternary import quant
from nanochat_jax.ternary.linear import packed_dot, ternary_dot


class BitLinear(nn.Module):
    """y = x_q @ W_q with absmean-ternary W and per-token int8 x (STE); plain x @ W when dense.

    The kernel is an fp32 latent `[in, out]`; quantised views are recomputed every call and
    never stored. `product` "fake_quant" multiplies dequantised floats; "kernel" runs
    `ternary_dot` (packed 2-bit kernel, custom-VJP STE) on the kernel `backend` (model/config.py
    TERNARY_PRODUCTS, KERNEL_BACKENDS). When the variables hold a `packed/kernel` (see
    model/packed.py) the layer runs from it alone, on `backend`. The model builds its layers
    with `bit_linear`.
    Under a mesh the kernel runs per shard, placed by the sharding rule of this layer's
    kernel (model/axes.py `kernel_layout`). No bias (BitNet has none).
    """

    features: int
    ternary: bool = True
    init_std: float = 0.02
    product: str = "kernel"
    backend: str = "auto"
    fp4: Any = None  # ternary.fp4.Backward: the dense path's backward in FP4

    @nn.compact
    def __call__(self, x: jax.Array, carrier: collider.Carrier | None = None):
        """x [..., in] -> y [..., out]; with a Collider carrier -> (y, carrier), the
        backward then running on the kept rows only (nanochat_jax/collider.py)."""
        layout = kernel_layout("/".join(self.path + ("kernel",)))
        if self.has_variable("packed", "kernel"):
            if not self.ternary:
                raise ConfigError(
                    f"{'/'.join(self.path)}: packed ternary weights given to a dense model "
                    f"(model.ternary=False): model.packed.pack_params ternarises weights, "
                    f"which would change this model; run it from its latent params")
            return packed_dot(x, self.get_variable("packed", "kernel"), self.backend, layout)
        w = self.param("kernel", nn.initializers.normal(self.init_std),
                       (x.shape[-1], self.features), jnp.float32)  # [in, out]
        if carrier is not None:
            if self.fp4 is not None and not self.ternary:
                raise ConfigError("Collider's filtered backward and an FP4 backward of dense "
                                  "layers do not combine (it would silently run in full "
                                  "precision): set collider.enabled=False or "
                                  "model.fp4_backward=none")
            mode = self.product if self.ternary else "dense"
            return collider.linear(x, w, carrier, mode, self.backend, layout)
        if not self.ternary:
            if self.fp4 is not None:  # no "fp4" rng: inference; its backward is refused
                return self.fp4.dot(x, w, self.make_rng("fp4") if self.has_rng("fp4") else None)
            return jnp.dot(x, w.astype(x.dtype))
        if self.product == "fake_quant":
            x_q, w_q = quant.quantize_activations_ste(x), quant.quantize_weights_ste(w)
            return jnp.dot(x_q, w_q.astype(x.dtype))
        return ternary_dot(x, w, self.backend, layout)


def bit_linear(cfg: ModelConfig, features: int, name: str, init_std: float | None = None
               ) -> BitLinear:
    """The model's BitLinear with `features` outputs, computing as `cfg` says (ternary or
    dense, product, kernel backend, FP4 backward); `init_std` defaults to `cfg.init_std`."""
    return BitLinear(features, ternary=cfg.ternary,
                     init_std=cfg.init_std if init_std is None else init_std,
                     product=cfg.ternary_product, backend=cfg.kernel_backend, fp4=cfg.fp4,
                     name=name)


def linear_with(layer: BitLinear, x: jax.Array, carrier: collider.Carrier | None):
    """(y, carrier) of a BitLinear call, with or without a Collider carrier."""
    return (layer(x), None) if carrier is None else layer(x, carrier)


def rms_norm(cfg: ModelConfig, name: str | None = None) -> nn.RMSNorm:
    """RMSNorm with fp32 statistics and fp32 gain, output in the compute dtype."""
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, name=name)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables for rotate-half RoPE.  positions: [T] or [B, T] -> each [..., head_dim/2]."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape(
        (1,) * positions.ndim + inv_freq.shape)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (GPT-NeoX / HF Llama convention).

    x: [B, T, N, H]; cos/sin: [T, H/2] (every row at the same positions) or [B, T, H/2].
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = (a[None, :, None, :] if a.ndim == 2 else a[:, :, None, :] for a in (cos, sin))
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """The first index of the largest logit over the last axis: logits [..., V] -> int32 [...],
    `jnp.argmax`'s answer for finite logits (a row holding NaN gives 0). Two plain reductions
    (the max, then the first index holding it), because XLA:CPU lowers argmax's (value,
    index) reduce to a scalar loop: 40-100 us per decode step at V = 8192 (BUILD.md)."""
    n = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == top, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
    return jnp.where(first == n, 0, first)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array
                     ) -> jax.Array:
    """Attention of new queries to a KV cache: q [B, T, N, Dh] at positions [B, T];
    k, v [B, Hkv, S, Dh] (model/kv_cache.py layout); each query sees the slots at or before
    its position. Scores and softmax in float32. -> [B, T, N, Dh] in q's dtype."""
    b, t, n, dh = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, t, hkv, n // hkv, dh).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
    q = q.reshape(b, hkv, -1, dh)  # [B, Hkv, G T, Dh]
    scores = jnp.einsum("bhqd,bhsd->bhqs", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * dh ** -0.5
    visible = jnp.arange(k.shape[2])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    visible = jnp.tile(visible, (1, n // hkv, 1))[:, None]  # [B, 1, G T, S]
    weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqs,bhsd->bhqd", weights.astype(q.dtype), v.astype(q.dtype),
                     preferred_element_type=jnp.float32)  # [B, Hkv, G T, Dh]
    out = out.reshape(b, hkv, n // hkv, t, dh).transpose(0, 3, 1, 2, 4)  # [B, T, Hkv, G, Dh]
    return out.reshape(b, t, n, dh).astype(q.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary embeddings and BitNet's attn_sub_norm.

    Without `kv` it attends within x (training, full-sequence evaluation). With `kv` =
    (k_cache, v_cache), each [B, Hkv, S, Dh] (model/kv_cache.py), the new keys and values
    are written at their `positions` [B, T] (consecutive per row, rows may differ) and
    every query attends to the slots at or before its own position: the KV-cache path of
    prefill and decode.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, carrier: collider.Carrier | None = None,
                 kv: tuple[jax.Array, jax.Array] | None = None,
                 positions: jax.Array | None = None):
        """x [B, T, D] (already normed) -> (out [B, T, D], carrier, updated kv or None)."""
        cfg = self.cfg
        b, t, _ = x.shape

        def dense(h, n, name, std=None):
            return linear_with(bit_linear(cfg, n, name, std), h, carrier)

        q, carrier = dense(x, cfg.n_heads * cfg.head_dim, "q")
        k, carrier = dense(x, cfg.n_kv_heads * cfg.head_dim, "k")
        v, carrier = dense(x, cfg.n_kv_heads * cfg.head_dim, "v")
        q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
        k, v = (a.reshape(b, t, cfg.n_kv_heads, cfg.head_dim) for a in (k, v))
        cos, sin = rotary_tables(jnp.arange(t) if kv is None else positions, cfg.head_dim,
                                 cfg.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, N, H]
        else:
            kv = tuple(write_slots(cache, new, positions[:, 0]) for cache, new in
                       zip(kv, (k, v), strict=True))  # each [B, Hkv, S, Dh]
            out = cached_attention(q, *kv, positions)
        out = rms_norm(cfg, "attn_sub_norm")(out.reshape(b, t, -1))
        out, carrier = dense(out, cfg.d_model, "o", cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        return out, carrier, kv


class FeedForward(nn.Module):
    """Gated FFN: W_down(ffn_sub_norm(act(x W_1) * (x W_3))), act = relu^2 (BitNet b1.58)
    or silu (SwiGLU) by `ffn_activation`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, carrier: collider.Carrier | None = None):
        """x [B, T, D] (already normed) -> (out [B, T, D], carrier)."""
        cfg = self.cfg

        gate, carrier = linear_with(bit_linear(cfg, cfg.d_ff, "w1"), x, carrier)  # [B, T, F]
        up, carrier = linear_with(bit_linear(cfg, cfg.d_ff, "w3"), x, carrier)  # [B, T, F]
        act = jax.nn.silu(gate) if cfg.ffn_activation == "silu" else jnp.square(jax.nn.relu(gate))
        h = act * up
        h = rms_norm(cfg, "ffn_sub_norm")(h)
        w2 = bit_linear(cfg, cfg.d_model, "w2", cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        return linear_with(w2, h, carrier)
