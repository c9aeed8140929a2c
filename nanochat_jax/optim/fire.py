"""FIRE: re-initialise hidden matrices to their nearest scaled isometry (docs/techniques.md#fire).

"FIRE: Frobenius-Isometry Reinitialization for Balancing the Stability-Plasticity
Tradeoff" (ICLR 2026). Applied once, at a data-distribution boundary (continual
pre-training): every selected weight W is replaced by `sqrt(d_out / d_in) * polar(W)`, the
closest matrix (Frobenius, Procrustes) whose singular values all equal `sqrt(d_out / d_in)`.

Layout: Flax kernels are `[in, out]` (`y = x @ W`), so `d_in = W.shape[0]` and
`d_out = W.shape[1]`. After convergence every singular value of W' is `c = sqrt(d_out/d_in)`,
so the Gram matrix on the SHORT side is `c^2 I = (d_out / d_in) I`:

    tall  [in, out], d_in >= d_out:  W'^T W' = (d_out/d_in) I_{d_out}   (docs/techniques.md#fire)
    wide  [in, out], d_in <= d_out:  W' W'^T = (d_out/d_in) I_{d_in}

(the long-side Gram is `c^2` times a rank-min(d_in, d_out) projector, not a multiple of I).
For a wide kernel the scale keeps activations' RMS per unit exactly: `|x W'|^2 =
(d_out/d_in) |x|^2`, i.e. `|x W'|^2 / d_out = |x|^2 / d_in`. A tall kernel keeps only the
d_out-dimensional part of x: `|x W'|^2 = (d_out/d_in) |P x|^2` with P the projection on
W's row space, `(d_out/d_in)^2 |x|^2` on average over directions, so the RMS per output
unit shrinks by `sqrt(d_out/d_in)` there. In PyTorch's `[out, in]` layout the same matrix is
W'^T, which is tall when d_out > d_in, and the tall `W^T W = (d_out/d_in) I` then reads
`W'_flax W'_flax^T`: the statement holds for any layout as long as "tall" means rows >= cols
of the matrix written.

What is selected: by default the hidden matrices (model/params.py `is_hidden`: the BitLinear
kernels, q, k, v, o separately; w1, w2, w3; MTP's proj). The embedding, the LM head (tied or
not) and the norms are left as they are: an embedding table is a lookup, not a linear map
whose isometry matters, and leaving it alone keeps a tied embedding from being orthogonalised.

Optimizer state policy: the moments of every re-initialised leaf are reset to zero (Adam's
mu and nu, Muon's momentum); everything else, including the step counts shared by all
leaves, is kept. With the count kept, Adam's bias correction is ~1 for the reset leaves, so
k steps after the reset their update is (1 - b1^k) / sqrt(1 - b2^k) times a settled one
(for a steady gradient): with this project's b2 = 0.95 that is 0.45 at k = 1, 1.0 at k = 10
and at most ~1.1 (a soft warm restart); with b2 = 0.999 it would be 3.2 at k = 1 and ~6.5 near
k = 12, so lower the LR for a while if you FIRE an Adam run with a large b2. Muon's update
is orthogonalised, so its scale does not depend on the momentum's. GaLore's projectors are
kept (see `reset_moments`).

`python -m nanochat_jax.cli.fire --workdir=RUN --out=NEW` applies it to a run's
checkpoint (train/fire_checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.model.params import is_hidden

Select = Callable[[Any, jax.Array], bool]
# Newton-Schulz iterations: 10 (FIRE's default) leaves a 128x128 Gaussian kernel's singular values
# down to 0.02 c (isometry error 0.22); 30 converges for the presets' shapes. The run's
# default is experiments/configs/base.py `optimizer.fire.iters` (a test keeps them equal).
ITERS = 30
# Optimizer-state fields that mirror params but are not moments: reset_moments keeps them.
NOT_MOMENTS = ("projectors",)  # nanochat_jax.optim.galore.GaLoreState
_HIGHEST = jax.lax.Precision.HIGHEST  # TPU/GPU default f32 matmuls would stall at ~1e-3


def nearest_isometry(w: jax.Array, iters: int = ITERS) -> jax.Array:
    """`sqrt(d_out / d_in) * U V^T` for `w = U S V^T`: FIRE on one `[in, out]` kernel.

    Cubic Newton-Schulz on `X = W / ||W||_F` in the tall orientation, `X <- 1.5 X -
    0.5 X (X^T X)`, converges to the polar factor U V^T (docs/techniques.md#fire). The Frobenius
    normalisation puts every singular value in (0, 1], where the iteration converges;
    a singular value s/||W||_F grows ~1.5x per step while small, so iters must be about
    log_1.5(||W||_F / s_min) + 5: ~15-25 for rectangular Gaussian matrices of width 32-64,
    ~50 for square Gaussian ones. Singular values that are exactly 0 stay 0 (a zero or
    rank-deficient matrix is not made an isometry). Computed in float32, returned in w's dtype.
    """
    if w.ndim > 2:  # a stack of kernels [..., in, out] (model.scan_layers): each on its own
        flat = w.reshape(-1, *w.shape[-2:])
        return jax.vmap(lambda m: nearest_isometry(m, iters))(flat).reshape(w.shape)
    if w.ndim != 2:
        raise ValueError(f"FIRE needs a 2-D [in, out] kernel, got shape {w.shape}; select "
                         f"only matrices (see model/params.py is_hidden)")
    d_in, d_out = w.shape
    x = w.astype(jnp.float32)
    wide = d_in < d_out
    if wide:
        x = x.T  # tall orientation: [m, n], m >= n, so X^T X is the small [n, n] Gram
    norm = jnp.linalg.norm(x)
    x = x / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)  # a zero matrix stays zero

    def newton_schulz(_, x):  # x: [m, n]
        gram = jnp.matmul(x.T, x, precision=_HIGHEST)  # [n, n]
        return 1.5 * x - 0.5 * jnp.matmul(x, gram, precision=_HIGHEST)

    x = jax.lax.fori_loop(0, iters, newton_schulz, x)
    if wide:
        x = x.T
    return (np.sqrt(d_out / d_in) * x).astype(w.dtype)


def isometry_error(w: jax.Array) -> jax.Array:
    """max |G - (d_out/d_in) I| for the short-side Gram G of an `[in, out]` kernel, the
    largest over a stack `[..., in, out]` (model.scan_layers).

    G = W^T W for tall kernels (d_in >= d_out), W W^T for wide ones; 0 for FIRE's output
    at convergence (see the module docstring).
    """
    d_in, d_out = w.shape[-2:]
    w = w.astype(jnp.float32)
    w_t = jnp.swapaxes(w, -1, -2)
    gram = jnp.matmul(w_t, w, precision=_HIGHEST) if d_in >= d_out else jnp.matmul(
        w, w_t, precision=_HIGHEST)  # [..., min, min]
    eye = jnp.broadcast_to(jnp.eye(gram.shape[-1]), gram.shape)
    return jnp.max(jnp.abs(gram - (d_out / d_in) * eye))


def fire_params(params: Any, select: Select = is_hidden, iters: int = ITERS) -> Any:
    """params with every leaf where `select(path, leaf)` replaced by its nearest isometry.

    FIRE (docs/techniques.md#fire) on a whole model; other leaves are returned as is.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, x: nearest_isometry(x, iters) if select(path, x) else x, params)


def reset_moments(opt_state: Any, params: Any, select: Select = is_hidden) -> Any:
    """opt_state with the state of every selected param (Adam mu/nu, Muon momentum) zeroed.

    FIRE moves the selected weights far from where their moments were gathered, so those
    moments are reset (docs/techniques.md#fire). A state subtree "mirrors" params when params'
    tree structure is a prefix of it: Adam's mu and nu, Muon's momentum, and optax.partition
    / masked states, whose non-participating leaves are `optax.MaskedNode` (no arrays, so
    nothing to zero there). A selected position holding a subtree (a quantised state's
    codes and scales) has all its arrays zeroed. State fields named in `NOT_MOMENTS` are
    kept although they mirror params (GaLore's subspace bases: zeroed, they would stop the
    leaf's updates until the next refresh). Everything else (counts, hyperparameters,
    Newton-Schulz coefficients, states of unselected params) is returned unchanged.
    """
    leaves_with_path, params_def = jax.tree_util.tree_flatten_with_path(params)
    chosen = [bool(select(path, leaf)) for path, leaf in leaves_with_path]

    def mirrors(node) -> bool:
        try:
            params_def.flatten_up_to(node)
        except (ValueError, TypeError):
            return False
        return True

    def reset(path, node):
        if not mirrors(node) or any(getattr(k, "name", None) in NOT_MOMENTS for k in path):
            return node
        parts = params_def.flatten_up_to(node)
        parts = [jax.tree.map(jnp.zeros_like, part) if c else part
                 for part, c in zip(parts, chosen, strict=True)]
        return params_def.unflatten(parts)

    return jax.tree_util.tree_map_with_path(reset, opt_state, is_leaf=mirrors)


def apply_fire(state: Any, iters: int = ITERS, select: Select = is_hidden) -> Any:
    """The TrainState after FIRE: selected params re-initialised, their moments reset.

    `step` and `rng` are kept, so the LR schedule and the data order continue where they were.
    """
    return state.replace(params=fire_params(state.params, select, iters),
                         opt_state=reset_moments(state.opt_state, state.params, select))
