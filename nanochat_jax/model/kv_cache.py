"""The KV cache of generation: keys and values of every attention layer, loop step and MTP depth.

Slots are token positions; row b holds its own sequence, so prompts of different lengths share
one cache (right-padded: a pad's slot is overwritten by the row's next real token before any
query can see it, since a query at position p sees only slots <= p). LoopLM runs the same
layers once per loop on different inputs: each loop has its own cache (docs/techniques.md#looplm).

Each attention layer has its own `[B, Hkv, S, Dh]` array, in the layout attention reads
(heads before slots: the score and value products need no transpose). Separate arrays let a
decode step write its slots in place (one in-bounds scatter on a donated buffer): the step
does no work proportional to the cache length except the attention itself. A single
`[R, L, ...]` array would be sliced and re-stacked every step, copying all of it.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from nanochat_jax.model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """R = loops, L = layers, M = MTP depth, B = rows, S = slots (positions).

    `k[t * L + i]`, `v[...]`: loop step t, layer i; `mtp_k[d]`, `mtp_v[d]`: MTP depth d
    (empty without MTP); every array [B, Hkv, S, Dh]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mtp_k: tuple[jax.Array, ...]
    mtp_v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)

        def arrays(n):
            return tuple(jnp.zeros(shape, dtype) for _ in range(n))

        main, mtp = cfg.loops * cfg.n_layers, cfg.mtp_depth
        return cls(arrays(main), arrays(main), arrays(mtp), arrays(mtp))

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self))


def _put(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B, Hkv, S, Dh] with row b's slots start[b] .. start[b] + T - 1 set to
    new [B, Hkv, T, Dh]. One scatter the caller promises in bounds (start + T <= S; out of
    bounds is undefined): XLA updates a donated buffer in place, where a vmapped
    dynamic_update_slice became a bounds-checked select that copied the whole cache."""
    b, hkv, t, _ = new.shape
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(hkv)[None, :, None]
    slots = (start[:, None] + jnp.arange(t)[None, :])[:, None, :]  # [B, 1, T]
    return cache.at[rows, heads, slots].set(new.astype(cache.dtype), mode="promise_in_bounds",
                                           unique_indices=True)


def write_slots(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B, Hkv, S, Dh] with row b's slots start[b] .. start[b] + T - 1 set to
    new [B, T, Hkv, Dh] (the attention's layout), in place (`_put`)."""
    return _put(cache, jnp.swapaxes(new, 1, 2), start)


def copy_slots(src: jax.Array, dst: jax.Array, positions: jax.Array) -> jax.Array:
    """dst [B, Hkv, S, Dh] with each row's slots at positions [B, T] (consecutive per row)
    taken from src (same shape), in place (`_put`)."""
    piece = jnp.take_along_axis(src, positions[:, None, :, None], axis=2)  # [B, Hkv, T, Dh]
    return _put(dst, piece, positions[:, 0])
