"""FP4 (E2M1) quantize-dequantize with NVFP4 and MXFP4 block scaling, stochastic rounding,
a random Hadamard transform, and `fp4_dot`, a matmul with an FP4 backward (docs/techniques.md#fp4).

E2M1 holds +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. A block of values shares one scale:
- NVFP4: blocks of 16, an E4M3 scale per block times one fp32 scale per tensor
  (s_enc = 6 * 448 / amax; block s_dec_b = e4m3(amax_b / 6 * s_enc); x^ = q s_dec_b / s_enc);
- MXFP4: blocks of 32, a power-of-two (E8M0) scale 2^(floor(log2 amax_b) - 2).
Rounding is round-to-nearest-even (forward) or stochastic (gradients: unbiased, E[q] = x).

This is simulation: values are rounded to what FP4 would hold and multiplied in fp32. Native
scaled FP4 matmuls (`jax.nn.scaled_matmul`) need a Blackwell GPU; on CPU, H100 and H200 this
module gives FP4's numerics, not its speed.

What is and is not simulated, against NVIDIA's NVFP4 pretraining recipe (2025): the recipe
quantises the forward GEMM's operands too, uses 16x16 2-D blocks for weights (so a weight
and its transpose share scales), and keeps the last layers, the LM head among them, in BF16.
Here only the backward pass is FP4 (dgrad and wgrad, gradients stochastically rounded,
the optional 16-point random Hadamard on wgrad's operands as in the recipe), with 1-D
blocks of 16 along each product's contraction axis; the forward is exact. It applies to a
dense model's linear layers and, only with `model.fp4_head=True`, to the LM head (off by
default, as in the recipe).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.errors import ConfigError

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = {"nvfp4": 16, "mxfp4": 32}
FORMATS = tuple(BLOCK)


def round_e2m1(x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """x (already scaled into [-6, 6]; larger saturates) to the E2M1 grid, as float32:
    nearest-even without `key`, stochastic (P(up) = distance from the lower grid point /
    gap) with it."""
    x = jnp.clip(x.astype(jnp.float32), -E2M1_MAX, E2M1_MAX)
    if key is None:
        return x.astype(jnp.float4_e2m1fn).astype(jnp.float32)
    grid = jnp.asarray(E2M1_GRID)
    a = jnp.abs(x)
    i = jnp.clip(jnp.searchsorted(grid, a, side="right") - 1, 0, len(E2M1_GRID) - 2)
    lo, hi = grid[i], grid[i + 1]
    up = jax.random.uniform(key, x.shape) < (a - lo) / (hi - lo)
    return jnp.sign(x) * jnp.where(up, hi, lo)


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, int]:
    """x [..., K] -> [..., K/block, block] (zero-padded), and the pad."""
    pad = -x.shape[-1] % block
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, block), pad


def _unblocks(xb: jax.Array, pad: int) -> jax.Array:
    x = xb.reshape(*xb.shape[:-2], -1)
    return x[..., :x.shape[-1] - pad] if pad else x


def block_scales(x: jax.Array, fmt: str, no_clip: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """(decode scale per block [..., K/block, 1], blocks [..., K/block, block]) of x [..., K]
    blocked along its last axis: x^ = round_e2m1(blocks / scale) * scale.

    The spec's scales (MXFP4: 2^(floor(log2 amax_b) - 2); NVFP4: E4M3 round-to-nearest) can
    put a block's largest values past 6, where E2M1 saturates. `no_clip` rounds the scales
    up instead (MXFP4: 2^ceil(log2(amax_b / 6)); NVFP4: the next E4M3 value up), so every
    value is in range: what keeps stochastic rounding unbiased.
    """
    if fmt not in BLOCK:
        raise ValueError(f"unknown FP4 format {fmt!r}: choose one of {', '.join(FORMATS)}")
    xb, _ = _blocks(x.astype(jnp.float32), BLOCK[fmt])
    amax_b = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    positive = jnp.where(amax_b > 0, amax_b, 1.0)
    if fmt == "mxfp4":  # E8M0 scales
        exponent = (ceil_log2(positive / E2M1_MAX) if no_clip
                    else floor_log2(positive) - 2)  # emax(E2M1) = 2
        return jnp.ldexp(jnp.ones_like(positive), exponent), xb  # exact (exp2 is not)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    s_enc = jnp.where(amax > 0, E2M1_MAX * E4M3_MAX / amax, 1.0)  # per tensor
    wanted = jnp.clip(amax_b / E2M1_MAX * s_enc, 0, E4M3_MAX)
    s_dec_b = wanted.astype(jnp.float8_e4m3fn).astype(jnp.float32)
    if no_clip:  # the next E4M3 value up where nearest rounded down
        s_dec_b = jnp.where(s_dec_b < wanted, next_e4m3(s_dec_b), s_dec_b)
    return s_dec_b / s_enc, xb


def floor_log2(x: jax.Array) -> jax.Array:
    """floor(log2 x) for x > 0, exact (from the float's exponent: float32 `log2` rounds
    some exact powers of two down, 8192 -> 12.999999)."""
    _, exponent = jnp.frexp(x)  # x = m 2^e, m in [0.5, 1)
    return exponent - 1


def ceil_log2(x: jax.Array) -> jax.Array:
    """ceil(log2 x) for x > 0, exact."""
    mantissa, exponent = jnp.frexp(x)
    return jnp.where(mantissa == 0.5, exponent - 1, exponent)


E4M3_MIN_NORMAL_EXP = -6  # smallest normal E4M3 exponent; subnormals step by 2^-9


def next_e4m3(s: jax.Array) -> jax.Array:
    """The next E4M3 value above s >= 0 (an E4M3 value): s + 2^(e - 3) for a normal s of
    exponent e, s + 2^-9 for a subnormal s (below 2^-6) or 0 (3 mantissa bits both)."""
    exponent = floor_log2(jnp.where(s > 0, s, 1.0))
    exponent = jnp.where(s > 0, jnp.maximum(exponent, E4M3_MIN_NORMAL_EXP),
                         E4M3_MIN_NORMAL_EXP)
    return s + jnp.ldexp(jnp.ones_like(s), exponent - 3)


def quantize(x: jax.Array, fmt: str, key: jax.Array | None = None) -> jax.Array:
    """FP4 quantize-dequantize of x along its last axis in `fmt` blocks: nearest-even, or
    stochastic rounding with `key` (scales rounded up, so unbiased: E[x^] = x). Same shape and
    dtype as x; an all-zero block stays zero."""
    scale, xb = block_scales(x, fmt, no_clip=key is not None)
    safe = jnp.where(scale > 0, scale, 1.0)
    q = round_e2m1(xb / safe, key) * scale
    return _unblocks(q, -x.shape[-1] % BLOCK[fmt]).astype(x.dtype)


def random_hadamard(key: jax.Array, n: int = 16) -> jax.Array:
    """H_n diag(random signs) / sqrt(n) [n, n]: orthogonal (H H^T = I), so it can rotate both
    operands of a product over that axis without changing it, spreading outliers first."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != n:
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    signs = jax.random.rademacher(key, (n,), jnp.float32)
    return jnp.asarray(h) * signs[None, :] / np.sqrt(n)


def _rotate_rows(x: jax.Array, h: jax.Array) -> jax.Array:
    """x [N, C] with every group of n consecutive rows rotated by h [n, n] (N padded)."""
    n = h.shape[0]
    pad = -x.shape[0] % n
    xg = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, n, x.shape[1])  # [N/n, n, C]
    return jnp.einsum("ij,gjc->gic", h.T, xg).reshape(-1, x.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fp4_dot(x: jax.Array, w: jax.Array, key: jax.Array, fmt: str, hadamard: bool) -> jax.Array:
    """x [..., K] @ w [K, N], exact forward; backward in FP4 `fmt`: gradients stochastically
    rounded, x and w nearest-even, each blocked along the product's contraction axis; with
    `hadamard` the weight gradient's operands are first rotated over the token axis by a
    16x16 random Hadamard (NVIDIA's NVFP4 recipe)."""
    return jnp.dot(x, w.astype(x.dtype))


def _fp4_dot_fwd(x, w, key, fmt, hadamard):
    return fp4_dot(x, w, key, fmt, hadamard), (x, w, key)


def _fp4_dot_bwd(fmt, hadamard, res, g):
    x, w, key = res
    k_dx, k_dw, k_h = jax.random.split(key, 3)
    x2, g2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32), g.reshape(-1, g.shape[-1])
    g2 = g2.astype(jnp.float32)
    # dx = g w^T: contraction over N (the last axis of g and of w)
    dx = jnp.dot(quantize(g2, fmt, k_dx), quantize(w.astype(jnp.float32), fmt).T)
    # dw = x^T g: contraction over the tokens
    if hadamard:
        h = random_hadamard(k_h)
        x2, g2 = _rotate_rows(x2, h), _rotate_rows(g2, h)
    dw = jnp.dot(quantize(x2.T, fmt), quantize(g2.T, fmt, k_dw).T)
    zero_key = np.zeros(key.shape, jax.dtypes.float0)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype), zero_key


fp4_dot.defvjp(_fp4_dot_fwd, _fp4_dot_bwd)


@jax.custom_vjp
def _dot_without_key(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for an FP4 layer applied without a rounding key: fine for inference (the
    forward is exact), refused when differentiated (every step would need its own draws)."""
    return jnp.dot(x, w.astype(x.dtype))


def _no_key_fwd(x, w):
    return _dot_without_key(x, w), None


def _no_key_bwd(_, g):
    raise ConfigError("the FP4 backward needs a rounding key per step: apply the model with "
                      "rngs={'fp4': key} (train/step.py folds one from the state's rng)")


_dot_without_key.defvjp(_no_key_fwd, _no_key_bwd)


@dataclasses.dataclass(frozen=True)
class Backward:
    """FP4 precision for a matmul's backward pass: format and whether to rotate the weight
    gradient's operands by a random Hadamard transform first."""

    fmt: str
    hadamard: bool = False

    def __post_init__(self):
        if self.fmt not in BLOCK:
            raise ValueError(f"unknown FP4 format {self.fmt!r}: choose one of "
                             f"{', '.join(FORMATS)}")

    def dot(self, x: jax.Array, w: jax.Array, key: jax.Array | None) -> jax.Array:
        """x [..., K] @ w [K, N] with this backward; `key` None: inference only."""
        if key is None:
            return _dot_without_key(x, w)
        return fp4_dot(x, w, key, self.fmt, self.hadamard)
