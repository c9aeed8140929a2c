"""8-bit optimizer states: blockwise int8 storage for any optax transform's float state.

`quantize_states(inner)` keeps the inner transform's large float state leaves (Muon momentum,
Adam moments, ...) as int8 codes plus one fp32 absmax per block of `block_size` elements, and
decodes them only for the duration of `inner.update` ("Effective Quantization of Muon Optimizer
States", 2025; bitsandbytes' blockwise 8-bit optimizers, Dettmers et al. 2022). The wrapped state
has the inner state's own structure with those leaves replaced by `QuantizedArray`, so it is a
pytree of arrays that jit, `optax.MultiSteps`, `optax.inject_hyperparams` and orbax handle
unchanged, and inner fields (e.g. `hyperparams`) stay readable where they were.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class QuantizedArray:
    """One state tensor as blockwise 8-bit codes; shape, dtype and map kind are static."""
    codes: jax.Array   # int8 [n_blocks, block_size]
    absmax: jax.Array  # f32 [n_blocks]
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False)
    dynamic: bool = flax.struct.field(pytree_node=False, default=False)


def create_dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic (tree) quantisation map: 256 sorted values in [-1, 1].

    bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`
    (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", §2): for each
    decade i = 0..6 the interval [0.1, 1] * 10^(i-6) is split into 2^i equal bins and the bin
    midpoints are kept with both signs (2 * 127 = 254 values); then 0 and 1.0 are added. Small
    magnitudes thus get fine relative resolution; one 0 so zeros survive, max 1.0 so the block
    maximum survives (the most negative value is -0.99..., not -1).
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2 ** i + 1)
        means = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        values += means.tolist() + (-means).tolist()
    table = np.sort(np.asarray(values, np.float32))  # [256]
    assert table.shape == (256,) and table[-1] == 1.0 and (table == 0).sum() == 1
    return table


_DYNAMIC_MAP = create_dynamic_map()  # f32 [256]
_DYNAMIC_MIDPOINTS = (_DYNAMIC_MAP[1:] + _DYNAMIC_MAP[:-1]) / 2  # f32 [255], decision boundaries


def quantize(x: jax.Array, block_size: int = 256, dynamic: bool = False) -> QuantizedArray:
    """Blockwise 8-bit encoding of `x`: flatten, zero-pad to a multiple of `block_size`, scale
    each block by its absmax, round to the nearest code (docs/techniques.md#8-bit-optimizer-states).

    Linear map: q = round(127 x / absmax) in [-127, 127]. Dynamic map: the index of the nearest
    `create_dynamic_map()` value, stored as index - 128. An all-zero block keeps absmax 0 and
    encodes to code 0, which decodes to 0 (no division by zero).
    """
    flat = jnp.ravel(x).astype(jnp.float32)  # [N]
    n_blocks = max(1, -(-flat.size // block_size))
    flat = jnp.pad(flat, (0, n_blocks * block_size - flat.size))
    blocks = flat.reshape(n_blocks, block_size)  # [n_blocks, block_size]
    absmax = jnp.max(jnp.abs(blocks), axis=1)  # [n_blocks]
    scale = jnp.where(absmax > 0, absmax, 1.0)[:, None]  # [n_blocks, 1]
    normed = jnp.clip(blocks / scale, -1.0, 1.0)  # [n_blocks, block_size]; the max is exactly ±1
    if dynamic:
        index = jnp.searchsorted(jnp.asarray(_DYNAMIC_MIDPOINTS), normed)  # 0..255, nearest
        codes = (index - 128).astype(jnp.int8)
    else:
        codes = jnp.round(normed * 127.0).astype(jnp.int8)
    return QuantizedArray(codes=codes, absmax=absmax, shape=tuple(x.shape),
                          dtype=jnp.dtype(x.dtype), dynamic=dynamic)


def dequantize(q: QuantizedArray) -> jax.Array:
    """Decode `q` back to its original shape and dtype: x^ = map(code) * absmax."""
    if q.dynamic:
        unit = jnp.asarray(_DYNAMIC_MAP)[q.codes.astype(jnp.int32) + 128]
    else:
        unit = q.codes.astype(jnp.float32) / 127.0  # code ±127 -> exactly ±1
    blocks = unit * q.absmax[:, None]  # [n_blocks, block_size]
    size = math.prod(q.shape)
    return blocks.reshape(-1)[:size].reshape(q.shape).astype(q.dtype)


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def _should_quantize(x, min_size: int) -> bool:
    """Float arrays of at least `min_size` elements; counts, scalars and small vectors stay."""
    return (isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)
            and x.size >= min_size)


def quantize_tree(tree, *, block_size: int = 256, min_size: int = 4096, dynamic: bool = False):
    """`tree` with every float array leaf of size >= `min_size` replaced by a QuantizedArray."""
    return jax.tree.map(
        lambda x: quantize(x, block_size, dynamic) if _should_quantize(x, min_size) else x, tree)


def dequantize_tree(tree):
    """Inverse of `quantize_tree`: every QuantizedArray decoded, other leaves untouched."""
    return jax.tree.map(lambda x: dequantize(x) if _is_quantized(x) else x, tree,
                        is_leaf=_is_quantized)


def quantize_states(inner: optax.GradientTransformation, *, block_size: int = 256,
                    min_size: int = 4096, dynamic: bool = False
                    ) -> optax.GradientTransformationExtraArgs:
    """`inner` with its float state leaves (>= `min_size` elements) stored as 8-bit blocks.

    "Effective Quantization of Muon Optimizer States" (2025): 8-bit Muon matches
    fp32 Muon in loss with ~1 byte per param of state. Each `update` dequantises, runs
    `inner.update`, and re-quantises; the quantisation error is not fed back (no error
    feedback, as in bitsandbytes' 8-bit optimizers). Do not use the linear map for Adam's
    second moment: its small entries decode to 0 and `m / sqrt(v)` explodes (a tiny-model
    run diverged); wrap only momentum-like states, or pass `dynamic=True`.
    """
    inner = optax.with_extra_args_support(inner)

    def quantize_(tree):
        return quantize_tree(tree, block_size=block_size, min_size=min_size,
                                               dynamic=dynamic)

    def init(params):
        # The inner init is usually constant (zeros); without the barrier XLA constant-folds
        # the whole quantisation at compile time under jit (seconds for a 1M-element state).
        return quantize_(jax.lax.optimization_barrier(inner.init(params)))

    def update(updates, state, params=None, **extra_args):
        updates, new_state = inner.update(updates, dequantize_tree(state), params, **extra_args)
        return updates, quantize_(new_state)

    return optax.GradientTransformationExtraArgs(init, update)
