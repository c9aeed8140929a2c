"""Collider (docs/techniques.md#collider): drop the backward work of unimportant tokens.

The forward pass is full. Per-token importance is the token's loss (or, with a reference
model, its excess loss over the reference: Rho-1's selective LM); the top
`kept = round(keep_ratio * B * T)` positions of each batch are kept (a static count, so
shapes never change) and the loss is averaged over them.

How the keep mask reaches the backward pass: a zero "carrier" `[B, T]` is threaded through
every BitLinear (`filtered_linear` returns it unchanged) and the loss adds
`sum(carrier_out * keep)`, which is 0 in value but makes the carrier's cotangent equal the
keep mask at every layer. Each BitLinear's custom VJP reads it there and runs its
backward on the kept rows only, as dense GEMMs with `kept` rows:

    dW = X[idx]^T dY[idx]            dX = zeros.at[idx].set(dY[idx] W^T)

Zeroing dX's dropped rows at every layer is Collider's approximation: dropped tokens'
cotangents stay exactly 0 all the way down, so what attention would send back through a
dropped token (kept queries reading its keys and values) is cut, and dropped positions
contribute nothing to any weight gradient. With keep ratio 1 it is the exact gradient.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from nanochat_jax.ternary import quant
from nanochat_jax.ternary.linear import Layout, int8_ternary_product

SCORES = ("loss", "excess_loss")


@flax.struct.dataclass
class Carrier:
    """The zero-valued per-token carrier threaded through the BitLinears, and the static
    number of kept positions (part of the pytree's structure, never traced)."""

    value: jax.Array  # [B, T] float32, all zeros
    kept: int = flax.struct.field(pytree_node=False)

    @classmethod
    def start(cls, shape: tuple[int, int], keep_ratio: float) -> Carrier:
        return cls(jnp.zeros(shape, jnp.float32), kept_count(keep_ratio, shape[0] * shape[1]))


def kept_count(keep_ratio: float, n_tokens: int) -> int:
    """The static number of positions kept per batch (at least 1)."""
    return max(1, min(n_tokens, round(keep_ratio * n_tokens)))


def keep_mask(scores: jax.Array, mask: jax.Array, kept: int) -> jax.Array:
    """The `kept` highest-scoring positions of the batch as a 0/1 float mask [B, T].

    Masked positions (padding) score -inf, so they are kept only when fewer than `kept`
    positions are valid (and then weigh nothing in the loss, which is masked too).
    """
    flat = jnp.where(mask, jax.lax.stop_gradient(scores), -jnp.inf).reshape(-1)
    _, idx = jax.lax.top_k(flat, kept)
    return jnp.zeros(flat.shape, jnp.float32).at[idx].set(1.0).reshape(scores.shape)


def _matmul(x: jax.Array, w: jax.Array, mode: str, impl: str, layout: Layout | None
            ) -> jax.Array:
    """The forward product of BitLinear in `mode` (dense, fake_quant or the packed kernel)."""
    if mode == "dense":
        return jnp.dot(x, w.astype(x.dtype))
    if mode == "fake_quant":
        return jnp.dot(quant.quantize_activations(x), quant.quantize_weights(w).astype(x.dtype))
    return int8_ternary_product(x, w, impl, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def filtered_linear(x: jax.Array, w: jax.Array, carrier: jax.Array, mode: str, impl: str,
                    kept: int, layout: Layout | None = None) -> tuple[jax.Array, jax.Array]:
    """(x [B, T, K] @ W [K, N], carrier [B, T]): BitLinear whose backward runs on the
    `kept` rows the carrier's cotangent marks (straight-through for ternary modes);
    `layout` places the kernel's shards under a mesh (ternary/linear.py)."""
    return _matmul(x, w, mode, impl, layout), carrier


def _fwd(x, w, carrier, mode, impl, kept, layout):
    return filtered_linear(x, w, carrier, mode, impl, kept, layout), (x, w)


def _bwd(mode, impl, kept, layout, residuals, cotangents):
    x, w = residuals
    gy, g_carrier = cotangents
    k, n = w.shape
    rows = g_carrier.size
    keep = g_carrier.reshape(rows) != 0
    idx = jnp.nonzero(keep, size=kept, fill_value=rows)[0]  # [kept]; out of range if short

    def take(a):
        return jnp.take(a, idx, axis=0, mode="fill", fill_value=0)

    x_rows, gy_rows = take(x.reshape(rows, k)), take(gy.reshape(rows, n))  # [kept, K], [kept, N]
    w_eff = w
    if mode != "dense":  # STE: gradients of the quantised product (per-token x quantisation)
        x_rows, w_eff = quant.quantize_activations(x_rows), quant.quantize_weights(w)
    # compute-dtype operands, fp32 accumulation (as ternary/linear.py's ste_grads)
    dw = jnp.dot(x_rows.T, gy_rows.astype(x_rows.dtype),
                 preferred_element_type=jnp.float32).astype(w.dtype)
    dx_rows = jnp.dot(gy_rows, w_eff.T.astype(gy.dtype),
                      preferred_element_type=jnp.float32)  # [kept, K]
    dx = jnp.zeros((rows, k), x.dtype).at[idx].set(dx_rows.astype(x.dtype), mode="drop")
    return dx.reshape(x.shape), dw, g_carrier


filtered_linear.defvjp(_fwd, _bwd)


def linear(x: jax.Array, w: jax.Array, carrier: Carrier, mode: str, impl: str,
           layout: Layout | None = None) -> tuple[jax.Array, Carrier]:
    """BitLinear's product with a Collider backward; passes the carrier on."""
    y, value = filtered_linear(x, w, carrier.value, mode, impl, carrier.kept, layout)
    return y, carrier.replace(value=value)
