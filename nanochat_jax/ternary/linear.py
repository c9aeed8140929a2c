"""ternary_dot: the BitLinear product through the packed-weight kernel, with an STE backward.

Forward (SPECS §1): per-token int8 codes of x, absmean ternary codes of W packed to 2 bits,
an exact int32 `ternary_matmul`, then `acc * g * absmax / 127`. Backward is the
straight-through estimator of the fake-quant product: `dx = gy W_q^T`, `dW = x_q^T gy`.
`jax.grad` cannot differentiate a `pallas_call`, hence the `custom_vjp`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nanochat_jax.ternary import kernel, packing, quant


def packed_dot(x: jax.Array, w: packing.PackedTernary, impl: str = "auto") -> jax.Array:
    """x [..., K] @ a packed ternary weight -> [..., N], activations int8 per token."""
    lead, k = x.shape[:-1], x.shape[-1]
    x_codes, absmax = quant.int8_codes(x.reshape(-1, k))  # [M, K] int8, [M, 1]
    acc = kernel.ternary_matmul(x_codes, w, impl=impl)  # [M, N] int32, exact
    y = acc.astype(jnp.float32) * (absmax / quant.INT8_MAX) * w.scale
    return y.astype(x.dtype).reshape(*lead, w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ternary_dot(x: jax.Array, w: jax.Array, impl: str = "auto") -> jax.Array:
    """x [..., K] @ ternary(W [K, N]) with int8 x, via the packed kernel; STE gradients."""
    return packed_dot(x, packing.pack(w), impl)


def _fwd(x, w, impl):
    return ternary_dot(x, w, impl), (x, w)


def _bwd(impl, residuals, gy):
    x, w = residuals
    k, n = w.shape
    x_q = quant.quantize_activations(x).reshape(-1, k)  # [M, K]
    w_q = quant.quantize_weights(w)  # [K, N]
    gy2 = gy.reshape(-1, n)  # [M, N]
    dx = jnp.dot(gy2, w_q.T.astype(gy.dtype)).reshape(x.shape).astype(x.dtype)
    dw = jnp.dot(x_q.T.astype(jnp.float32), gy2.astype(jnp.float32)).astype(w.dtype)
    return dx, dw


ternary_dot.defvjp(_fwd, _bwd)
