"""mHC: manifold-constrained hyper-connections (docs/techniques.md#mhc).

The residual stream is widened to n copies, `x: [B, T, n, D]`. Around each sub-layer F
(attention, FFN) three maps mix it:

    x_next = H_res x + H_post^T F(H_pre x)      H_pre, H_post: [n], H_res: [n, n]

`H_res` is projected onto the doubly stochastic matrices by Sinkhorn-Knopp (in log space),
so products of them over depth stay doubly stochastic and the signal gain stays near 1,
where unconstrained hyper-connections let it grow by orders of magnitude.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def sinkhorn(logits: jax.Array, iters: int) -> jax.Array:
    """exp(logits) [..., n, n] -> doubly stochastic [..., n, n] by alternating column and
    row normalisation in log space (rows last, so row sums are exact)."""
    def normalise(_, log_m):
        log_m = log_m - jax.nn.logsumexp(log_m, axis=-2, keepdims=True)  # columns
        return log_m - jax.nn.logsumexp(log_m, axis=-1, keepdims=True)  # rows

    # fori_loop with static bounds lowers to a scan: one traced body, reverse-differentiable
    return jnp.exp(jax.lax.fori_loop(0, iters, normalise, logits.astype(jnp.float32)))


def composite_gain(res_maps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Amax gain of `A = H^(L) ... H^(1)` for maps `[L, ..., n, n]` in depth order.

    Returns (forward gain, backward gain), each averaged over the leading token axes:
    forward = max absolute row sum of A (how much a signal can grow going up),
    backward = max absolute column sum (how much a gradient can grow going down).
    """
    product = res_maps[0]
    for h in res_maps[1:]:
        product = jnp.matmul(h, product)  # latest layer on the left
    a = jnp.abs(product)
    return jnp.mean(jnp.max(jnp.sum(a, -1), -1)), jnp.mean(jnp.max(jnp.sum(a, -2), -1))


def hyper_read(x: jax.Array, h_pre: jax.Array) -> jax.Array:
    """The sub-layer input H_pre x: x [B, T, n, D], h_pre [B, T, n] -> [B, T, D]."""
    return jnp.einsum("btn,btnd->btd", h_pre.astype(x.dtype), x)


def hyper_write(x: jax.Array, y: jax.Array, h_post: jax.Array, h_res: jax.Array) -> jax.Array:
    """The next stream H_res x + H_post^T y: y [B, T, D], h_post [B, T, n], h_res
    [B, T, n, n] -> [B, T, n, D]."""
    mixed = jnp.einsum("btij,btjd->btid", h_res.astype(x.dtype), x)
    return mixed + h_post.astype(x.dtype)[..., None] * y[:, :, None, :]


def hyper_residual(x: jax.Array, sublayer, h_pre: jax.Array, h_post: jax.Array,
                   h_res: jax.Array) -> jax.Array:
    """x [B, T, n, D] -> H_res x + H_post^T sublayer(H_pre x), maps per token."""
    return hyper_write(x, sublayer(hyper_read(x, h_pre)), h_post, h_res)


class HyperMaps(nn.Module):
    """The maps (H_pre, H_post, H_res) of one sub-layer, per token, from x [B, T, n, D].

    `H~ = a (RMSNorm(vec x) phi) + b` (dynamic) or `H~ = b` (static); then
    H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn. Initialised as Zhu et al.'s
    hyper-connections: read mostly stream `layer mod n`, write to every stream, identity-like
    residual; the dynamic gains `a` start at `alpha_init`.
    """

    streams: int
    sinkhorn_iters: int = 20
    dynamic: bool = True
    alpha_init: float = 0.01
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, layer: int | jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, n, D] -> (H_pre [B, T, n], H_post [B, T, n], H_res [B, T, n, n]); `layer`,
        this sub-layer's index in depth order (a traced int under `nn.scan`), picks the
        stream it reads first."""
        n = self.streams
        read = jnp.arange(n) == layer % n
        # explicit float32: a weakly typed initial value would make the first update (strong
        # float32) retrace and recompile the train step
        b_pre = self.param("b_pre", lambda *_: jnp.where(read, 3.0, -3.0).astype(jnp.float32),
                           (n,))
        b_post = self.param("b_post", nn.initializers.zeros, (n,))
        eye = jnp.eye(n, dtype=bool)
        b_res = self.param("b_res", lambda *_: jnp.where(eye, 0.0, -4.0).astype(jnp.float32),
                           (n, n))
        pre, post, res = b_pre, b_post, b_res  # static maps
        if self.dynamic:
            b, t = x.shape[:2]
            v = nn.RMSNorm(epsilon=self.norm_eps, name="norm")(x.reshape(b, t, -1))  # [B,T,nD]
            phi_init = nn.initializers.normal(v.shape[-1] ** -0.5)
            phi = self.param("phi", phi_init, (v.shape[-1], 2 * n + n * n), jnp.float32)
            alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (3,))
            d = jnp.dot(v.astype(jnp.float32), phi)  # [B, T, 2n + n^2]
            pre = alpha[0] * d[..., :n] + b_pre[None, None]
            post = alpha[1] * d[..., n:2 * n] + b_post[None, None]
            res = alpha[2] * d[..., 2 * n:].reshape(b, t, n, n) + b_res[None, None]
        maps = jax.nn.sigmoid(pre), 2.0 * jax.nn.sigmoid(post), sinkhorn(res, self.sinkhorn_iters)
        if self.dynamic:
            return maps
        shape = x.shape[:2]  # static: one set of maps, shared by every token
        return tuple(jnp.broadcast_to(m, (*shape, *m.shape)) for m in maps)
