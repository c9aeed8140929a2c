"""Token cross-entropy computed over vocabulary chunks, with optional z-loss.

The LM head is applied inside the loss, one `[N, chunk]` slab of logits at a time, with an
online logsumexp (running max, running sum of exp). The scan body is rematerialised
(`jax.checkpoint`), so neither forward nor backward ever holds all `[B, T, V]` logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossOutput(NamedTuple):
    loss: jax.Array  # scalar: mean CE over unmasked tokens + z-loss
    ce: jax.Array  # scalar: mean CE over unmasked tokens (nats)
    entropy: jax.Array  # scalar: mean entropy of the predicted distribution (no gradient)
    token_ce: jax.Array  # [B, T] per-token CE (zero where masked)


class _Carry(NamedTuple):
    max: jax.Array  # [N] running max logit (no gradient)
    sum_exp: jax.Array  # [N] sum exp(z - max)
    sum_exp_z: jax.Array  # [N] sum exp(z - max) * z, for the entropy
    target_logit: jax.Array  # [N]


def _chunk_step(h, targets, vocab_size, chunk_size, carry: _Carry, xs):
    """Fold one vocabulary chunk of logits into the running logsumexp."""
    w, start = xs  # w: [D, C] head columns start .. start + C
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)  # [N, C]
    col = start + jnp.arange(chunk_size)
    valid = col < vocab_size  # the last chunk may be padding
    z = jnp.where(valid[None, :], z, -jnp.inf)
    new_max = jax.lax.stop_gradient(jnp.maximum(carry.max, jnp.max(z, axis=-1)))
    rescale = jnp.exp(carry.max - new_max)
    e = jnp.exp(z - new_max[:, None])  # [N, C], 0 on padding
    z_finite = jnp.where(valid[None, :], z, 0.0)
    hit = col[None, :] == targets[:, None]
    return _Carry(
        max=new_max,
        sum_exp=carry.sum_exp * rescale + jnp.sum(e, axis=-1),
        sum_exp_z=carry.sum_exp_z * rescale + jnp.sum(e * jax.lax.stop_gradient(z_finite), -1),
        target_logit=carry.target_logit + jnp.sum(jnp.where(hit, z_finite, 0.0), axis=-1),
    ), None


def chunked_cross_entropy(
    hidden: jax.Array,  # [B, T, D]
    head: jax.Array,  # [D, V]
    targets: jax.Array,  # [B, T] int
    mask: jax.Array | None = None,  # [B, T]; 0 marks padding
    *,
    chunk_size: int = 8192,
    z_loss: float = 0.0,
) -> LossOutput:
    """Mean next-token CE over unmasked tokens, plus `z_loss * mean(logsumexp^2)` (PaLM)."""
    b, t, d = hidden.shape
    vocab = head.shape[1]
    chunk = min(chunk_size, vocab)
    n_chunks = -(-vocab // chunk)
    head = jnp.pad(head, ((0, 0), (0, n_chunks * chunk - vocab)))
    w_chunks = head.reshape(d, n_chunks, chunk).transpose(1, 0, 2)  # [n_chunks, D, C]
    starts = jnp.arange(n_chunks) * chunk
    h = hidden.reshape(b * t, d).astype(head.dtype)
    tgt = targets.reshape(b * t)
    n = b * t
    init = _Carry(jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)), jnp.zeros((n,)))
    body = jax.checkpoint(lambda c, xs: _chunk_step(h, tgt, vocab, chunk, c, xs))
    carry, _ = jax.lax.scan(body, init, (w_chunks, starts))
    lse = carry.max + jnp.log(carry.sum_exp)  # [N]
    token_ce = lse - carry.target_logit
    entropy = jax.lax.stop_gradient(lse - carry.sum_exp_z / carry.sum_exp)

    m = jnp.ones((n,), jnp.float32) if mask is None else mask.reshape(n).astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(m), 1.0)
    mean = lambda x: jnp.sum(x * m) / denom
    ce = mean(token_ce)
    loss = ce + z_loss * mean(jnp.square(lse)) if z_loss else ce
    return LossOutput(loss, ce, mean(entropy), (token_ce * m).reshape(b, t))


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Plain mean CE from full logits [B, T, V]: the reference the chunked version must equal."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)
