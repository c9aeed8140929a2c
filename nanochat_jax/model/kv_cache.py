"""The KV cache of generation: keys and values of every attention layer, loop step and MTP depth.

Slots are token positions; row b holds its own sequence, so prompts of different lengths share
one cache (right-padded: a pad's slot is overwritten by the row's next real token before any
query can see it, since a query at position p sees only slots <= p). LoopLM runs the same
layers once per loop with different inputs, so each loop step has its own cache (SPECS §9).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from nanochat_jax.model.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """R = loops, L = layers, M = MTP depth, B = rows, S = slots (positions)."""

    k: jax.Array  # [R, L, B, S, Hkv, Dh]
    v: jax.Array  # [R, L, B, S, Hkv, Dh]
    mtp_k: jax.Array | None  # [M, B, S, Hkv, Dh], None without MTP
    mtp_v: jax.Array | None

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
        main = jnp.zeros((cfg.loops, cfg.n_layers) + shape, dtype)
        mtp = jnp.zeros((cfg.mtp_depth,) + shape, dtype) if cfg.mtp_depth else None
        return cls(main, main, mtp, mtp)

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self))


def copy_slots(src: jax.Array, dst: jax.Array, positions: jax.Array) -> jax.Array:
    """dst [L, B, S, ...] with each row's slots at positions [B, T] taken from src (same shape)."""
    rows = jnp.arange(src.shape[1])[:, None]  # [B, 1]
    return dst.at[:, rows, positions].set(src[:, rows, positions])
