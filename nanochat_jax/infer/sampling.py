"""Next-token sampling from logits: greedy, temperature, top-k and top-p (nucleus).

All functions are pure and jit-friendly: `top_k` is a static int (0 = off), `temperature`
and `top_p` may be traced scalars, so one compiled decode step serves every setting of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanochat_jax.model.layers import greedy_tokens


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    """logits [..., V] with all but the k largest set to -inf (ties at the k-th kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def filter_top_p(logits: jax.Array, p: jax.Array | float) -> jax.Array:
    """logits [..., V] keeping the smallest set of tokens whose probability reaches p
    (the most likely token always survives); p >= 1 keeps everything: a Python p >= 1 returns
    the logits untouched (no sort), a traced one selects them (fp32's cumulative sum can
    reach 1 before the tail, which would drop tokens)."""
    if isinstance(p, (int, float)) and p >= 1:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep_sorted = (before < p).at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
    return jnp.where(keep | (jnp.asarray(p) >= 1), logits, -jnp.inf)


def sample(key: jax.Array, logits: jax.Array, *, temperature: jax.Array | float = 1.0,
           top_k: int = 0, top_p: jax.Array | float = 1.0) -> jax.Array:
    """One token id per row of logits [..., V] -> int32 [...]; temperature 0 is greedy."""
    logits = logits.astype(jnp.float32)
    greedy = greedy_tokens(logits)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy  # known greedy at trace time: no random draw, no filters
    t = jnp.asarray(temperature, jnp.float32)
    scaled = filter_top_p(filter_top_k(logits / jnp.maximum(t, 1e-6), top_k), top_p)
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(t > 0, drawn, greedy)
