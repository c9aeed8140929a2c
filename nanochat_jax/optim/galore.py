"""GaLore 2: run an inner optimizer on low-rank projections of 2-D gradients.

GaLore (Zhao et al. 2024, "Gradient Low-Rank Projection", Alg. 1) keeps optimizer moments in
an r-dimensional subspace of each weight gradient, refreshed every `update_every` steps from
the gradient's top singular vectors; GaLore 2 (2025) finds those vectors with a randomized
SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4: Gaussian sketch, power iterations with QR
re-orthonormalisation) instead of a full SVD.

For a 2-D gradient G [m, n] the projector lives on the short side, so the moments keep the
long side and the projector stays small (the original GaLore's choice):

    wide (m <= n): P [m, r] = top-r left singular vectors;  R = P^T G [r, n];  back = P N
    tall (m >  n): Q [n, r] = top-r right singular vectors; R = G Q   [m, r];  back = N Q^T

with r = min(rank, m, n), and the output is `scale * back(inner(R))`. Leading axes of a
leaf [..., m, n] (the layers of a `model.scan_layers` stack) are batch axes: each matrix
has its own projector.

Moments at a subspace switch: kept as they are, as in GaLore. The inner state (Adam's mu/nu,
Muon's momentum) is neither re-projected onto the new subspace nor zeroed; for a few steps
after a refresh it mixes coordinates of the old and new bases, which GaLore reports as
harmless at T = 200. Zeroing is not offered: the inner's step count (Adam's bias correction,
inject_hyperparams schedules) would survive the reset, and Adam restarted from zero moments
with a large count takes steps of ~sqrt(1/(1-b2)) times its usual size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanochat_jax.errors import ConfigError

SVD_METHODS = ("full", "randomized")


class GaLoreState(NamedTuple):
    """count: steps taken; projectors: P [..., m, r] (wide) / Q [..., n, r] (tall) per matrix
    leaf and an empty [0] placeholder per other leaf; inner_state: the inner's state in
    projected shapes."""

    count: jax.Array  # [] int32
    projectors: Any
    inner_state: optax.OptState


def _is_wide(shape: tuple[int, ...]) -> bool:
    """Wide leaves (m <= n) project rows with a left projector; tall ones columns, right."""
    return shape[-2] <= shape[-1]


def _projected_shape(shape: tuple[int, ...], r: int) -> tuple[int, ...]:
    """R's shape: [..., r, n] for a wide [..., m, n] leaf, [..., m, r] for a tall one."""
    *lead, m, n = shape
    return (*lead, r, n) if _is_wide(shape) else (*lead, m, r)


def _transpose(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _project(x: jax.Array, proj: jax.Array) -> jax.Array:
    """G [..., m, n] -> R: P^T G [..., r, n] (wide) or G Q [..., m, r] (tall)."""
    return _transpose(proj) @ x if _is_wide(x.shape) else x @ proj


def _back_project(n: jax.Array, proj: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inner update N (R's shape) -> [..., m, n]: P N (wide) or N Q^T (tall)."""
    return proj @ n if _is_wide(shape) else n @ _transpose(proj)


def full_svd_basis(a: jax.Array, r: int) -> jax.Array:
    """Top-r left singular vectors of a [s, t] by a full (thin) SVD: [s, r]."""
    u, _, _ = jnp.linalg.svd(a, full_matrices=False)  # u: [s, min(s, t)]
    return u[:, :r]


def randomized_svd_basis(a: jax.Array, r: int, key: jax.Array, *, power_iters: int = 2,
                         oversample: int = 8) -> jax.Array:
    """Approximate top-r left singular vectors of a [s, t] (s <= t): [s, r], orthonormal.

    Halko et al. 2011, Alg. 4.4 + 5.1: sketch the range with k = r + oversample Gaussian
    columns, sharpen it with `power_iters` rounds of (A^T, A) re-orthonormalised by QR (the
    error shrinks like (sigma_{k+1}/sigma_r)^(2q+1)), then take an exact SVD of the small
    [k, t] matrix Q^T A. Cost O(s t k) per pass instead of O(s t min(s, t)).
    """
    s, t = a.shape
    k = min(r + oversample, s, t)
    omega = jax.random.normal(key, (t, k), a.dtype)  # [t, k]
    q, _ = jnp.linalg.qr(a @ omega)  # [s, k]
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(a.T @ q)  # [t, k]
        q, _ = jnp.linalg.qr(a @ z)  # [s, k]
    u_small, _, _ = jnp.linalg.svd(q.T @ a, full_matrices=False)  # [k, k]
    return q @ u_small[:, :r]  # [s, r]


def galore(inner: optax.GradientTransformation, *, rank: int, update_every: int = 200,
           scale: float | str = 0.25, svd: str = "randomized", power_iters: int = 2,
           oversample: int = 8, seed: int = 0) -> optax.GradientTransformation:
    """Run `inner` on rank-`rank` projections of every matrix leaf ([m, n], or [..., m, n]
    with leading batch axes); back-project, times `scale`.

    `scale="rank"`: `sqrt(min(m, n) / r)` per leaf, for an orthogonalising inner (Muon):
    its back-projected update has r unit singular values where full-rank Muon's has
    min(m, n), so this gives both the same RMS at the same learning rate.

    GaLore 2 (docs/techniques.md#galore-2). Every leaf of rank >= 2 reaching it is projected:
    choose which leaves do with `optax.partition` / `optax.multi_transform`. Vectors and
    scalars pass to `inner` unprojected (and get no `scale`). The projector of each leaf is
    recomputed from the current gradient at steps 0, T, 2T, ... (T = `update_every`) inside
    one `lax.cond`, so the step compiles once. `svd="full"` uses `jnp.linalg.svd`;
    `svd="randomized"` uses `randomized_svd_basis` with a key folded from `seed`, the step
    and the leaf's index. SVDs run in float32; projectors, projected gradients and the
    inner's moments take each leaf's dtype. Moments are kept across a refresh (module doc).

    `inner` sees projected params (P^T W / W Q) as `params`, so transforms that need them
    (Muon's and AdamW's weight-decay step) run; but decay applied there acts only inside the
    subspace and is multiplied by `scale`: put full-space decoupled decay outside, e.g.
    `optax.chain(galore(...), optax.add_decayed_weights(wd), optax.scale(-lr))`.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"galore rank must be a positive int, got {rank!r}")
    if update_every < 1:
        raise ConfigError(f"galore update_every must be >= 1, got {update_every}")
    if not (scale == "rank" or isinstance(scale, (int, float))):
        raise ConfigError(f"galore scale must be a number or 'rank', got {scale!r}")
    if svd not in SVD_METHODS:
        raise ConfigError(f"unknown galore svd {svd!r}: choose one of {', '.join(SVD_METHODS)}")
    if power_iters < 0 or oversample < 0:
        raise ConfigError(f"galore power_iters and oversample must be >= 0, got "
                          f"{power_iters} and {oversample}")

    def eff_rank(shape):
        return min(rank, *shape[-2:])

    def leaf_scale(shape) -> float:
        return (min(shape[-2:]) / eff_rank(shape)) ** 0.5 if scale == "rank" else scale

    def placeholder_or_projector(x):
        if x.ndim < 2:
            return jnp.zeros((0,), x.dtype)
        *lead, m, n = x.shape
        short = m if _is_wide(x.shape) else n
        return jnp.zeros((*lead, short, eff_rank(x.shape)), x.dtype)  # filled at step 0

    def project_all(xs, projs):
        return [_project(x, p) if x.ndim >= 2 else x for x, p in zip(xs, projs, strict=True)]

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        proxies = [jnp.zeros(_projected_shape(x.shape, eff_rank(x.shape)), x.dtype)
                   if x.ndim >= 2 else jnp.zeros_like(x) for x in leaves]
        projectors = treedef.unflatten([placeholder_or_projector(x) for x in leaves])
        return GaLoreState(count=jnp.zeros([], jnp.int32), projectors=projectors,
                           inner_state=inner.init(treedef.unflatten(proxies)))

    def new_projector(g, i, count):
        a = (g if _is_wide(g.shape) else _transpose(g)).astype(jnp.float32)  # [..., short, long]
        r = eff_rank(g.shape)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), count), i)

        def basis(a, key):  # one matrix [short, long] -> [short, r]
            if svd == "full":
                return full_svd_basis(a, r)
            return randomized_svd_basis(a, r, key, power_iters=power_iters,
                                        oversample=oversample)

        lead = a.shape[:-2]
        if lead:  # one projector per matrix of the leading axes, each with its own key
            n = int(np.prod(lead))
            keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(n))
            # a loop over the matrices, not vmap: the vmapped (batched) randomized SVD inside
            # the refresh's cond deadlocked XLA:CPU's concurrency-optimized scheduler in a
            # scanned model's train step (tests/test_run_cli.py); a refresh is rare anyway
            matrices = a.reshape(n, *a.shape[-2:])
            bases = jax.lax.map(lambda pair: basis(*pair), (matrices, keys))
            return bases.reshape(*lead, *bases.shape[-2:]).astype(g.dtype)
        return basis(a, key).astype(g.dtype)  # [short, r]

    def update_fn(updates, state, params=None):
        grads, treedef = jax.tree.flatten(updates)
        old = jax.tree.leaves(state.projectors)
        refresh = state.count % update_every == 0

        def recompute():
            return [new_projector(g, i, state.count) if g.ndim >= 2 else p
                    for i, (g, p) in enumerate(zip(grads, old, strict=True))]

        projs = jax.lax.cond(refresh, recompute, lambda: old)
        low = treedef.unflatten(project_all(grads, projs))
        low_params = None
        if params is not None:
            low_params = treedef.unflatten(project_all(jax.tree.leaves(params), projs))
        inner_updates, inner_state = inner.update(low, state.inner_state, low_params)
        out = [(leaf_scale(g.shape) * _back_project(n, p, g.shape)).astype(g.dtype)
               if g.ndim >= 2 else n
               for g, n, p in zip(grads, jax.tree.leaves(inner_updates), projs, strict=True)]
        return treedef.unflatten(out), GaLoreState(
            count=optax.safe_int32_increment(state.count),
            projectors=treedef.unflatten(projs), inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
