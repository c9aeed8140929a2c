"""BitNet b1.58 number formats: absmean ternary weights, per-token absmax int8 activations.

Implements docs/techniques.md#bitnet (Ma et al. 2024, "The Era of 1-bit LLMs"). Scales are stored as
*multipliers*: a ternary tensor is `codes * g` with `g = mean|W|`; an int8 row is
`codes / s_x` with `s_x = 127 / absmax`, computed as `(codes / 127) * absmax`. The `*_ste`
functions are the training-time fake-quant with a straight-through estimator: forward sees
the quantised value, backward is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WEIGHT_EPS = 1e-5  # floor on mean|W| so an all-zero tensor does not divide by zero
ACT_EPS = 1e-5  # floor on a row's absmax for the same reason
INT8_MAX = 127.0


def weight_scale(w: jax.Array) -> jax.Array:
    """g = max(mean|W|, eps): the per-tensor absmean multiplier (a scalar)."""
    return jnp.maximum(jnp.mean(jnp.abs(w.astype(jnp.float32))), WEIGHT_EPS)


def ternary_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Absmean ternarisation: returns (codes in {-1, 0, +1} as int8, g) with W ~ codes * g."""
    g = weight_scale(w)
    codes = jnp.clip(jnp.round(w.astype(jnp.float32) / g), -1, 1)
    return codes.astype(jnp.int8), g


def quantize_weights(w: jax.Array) -> jax.Array:
    """W_q = clip(round(W / g), -1, 1) * g, in W's dtype; values lie in {-g, 0, +g}."""
    codes, g = ternary_codes(w)
    return (codes.astype(jnp.float32) * g).astype(w.dtype)


def activation_absmax(x: jax.Array) -> jax.Array:
    """max(absmax over the last axis, eps): one range per token.  [..., 1]"""
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.maximum(absmax, ACT_EPS)


def int8_codes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token absmax int8: returns (codes int8 [..., D], absmax [..., 1]).

    codes = round(x * s_x) with the multiplier s_x = 127 / absmax; they lie in [-127, 127]
    (the symmetric grid never produces -128). Dequantise as (codes / 127) * absmax, which
    reproduces each row's max exactly (codes / s_x can be 1 ulp off).
    """
    absmax = activation_absmax(x)
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) * (INT8_MAX / absmax)), -128, 127)
    return codes.astype(jnp.int8), absmax


def quantize_activations(x: jax.Array) -> jax.Array:
    """x_q = clip(round(x * s_x), -128, 127) / s_x, in x's dtype; idempotent."""
    codes, absmax = int8_codes(x)
    return ((codes.astype(jnp.float32) / INT8_MAX) * absmax).astype(x.dtype)


def _straight_through(x: jax.Array, x_q: jax.Array) -> jax.Array:
    """x + sg(x_q - x): forward value x_q, gradient of the identity."""
    return x + jax.lax.stop_gradient(x_q - x)


def quantize_weights_ste(w: jax.Array) -> jax.Array:
    """Ternary fake-quant of latent weights with a straight-through gradient."""
    return _straight_through(w, quantize_weights(w))


def quantize_activations_ste(x: jax.Array) -> jax.Array:
    """Int8 fake-quant of activations with a straight-through gradient."""
    return _straight_through(x, quantize_activations(x))
