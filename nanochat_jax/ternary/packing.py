"""I2: ternary weights packed 4 per byte (SPECS §2), the kernel's weight format.

Layout of a logical `[K, N]` weight (Flax `[in, out]`): K is padded to `4 * K4` rows, with
`K4` a multiple of `k_align`, and N to a multiple of `n_align` (padding codes mean 0). Byte
`(i, n)` of the packed `[K4, Np]` uint8 array holds rows `i + j * K4` for `j = 0..3` in
bits `2j..2j+1`, as `code = w + 1` in {0, 1, 2}. So every byte row serves four K-slabs, and
unpacking a `[bk4, bn]` tile gives four `[bk4, bn]` weight tiles that multiply four
`[bm, bk4]` slices of x: no interleaving, and any K tile size dividing `K4` works on the
same packed array.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from nanochat_jax.ternary import quant

K_ALIGN = 32  # packed rows are padded to a multiple of this (K to a multiple of 128)
N_ALIGN = 32


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@flax.struct.dataclass
class PackedTernary:
    """Packed ternary weight: `codes [K4, Np]` uint8, multiplier `scale` (g = mean|W|),
    and the logical `[K, N]` shape. W ~ unpack(codes)[:K, :N] * scale."""

    codes: jax.Array  # [K4, Np] uint8
    scale: jax.Array  # [] float32
    shape: tuple[int, int] = flax.struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        return int(self.codes.size) * self.codes.dtype.itemsize + int(self.scale.size) * 4


def pack_codes(codes: jax.Array, k_align: int = K_ALIGN, n_align: int = N_ALIGN) -> jax.Array:
    """int8 ternary codes `[K, N]` in {-1, 0, 1} -> packed `[K4, Np]` uint8 (layout above)."""
    k, n = codes.shape
    k4 = _round_up(_round_up(k, 4) // 4, k_align)
    n_p = _round_up(n, n_align)
    c = jnp.pad(codes.astype(jnp.int32) + 1, ((0, 4 * k4 - k), (0, n_p - n)), constant_values=1)
    slabs = c.reshape(4, k4, n_p)  # slab j = rows j*K4 .. (j+1)*K4
    packed = slabs[0] | (slabs[1] << 2) | (slabs[2] << 4) | (slabs[3] << 6)
    return packed.astype(jnp.uint8)


def unpack_codes(packed: jax.Array, shape: tuple[int, int] | None = None) -> jax.Array:
    """Packed `[K4, Np]` uint8 -> int8 codes `[4*K4, Np]`, cropped to `shape` if given (the
    rows that hold only padding are not unpacked)."""
    k4 = packed.shape[0]
    k = 4 * k4 if shape is None else shape[0]
    p = packed.astype(jnp.int32)
    slabs = [((p[: min(k4, k - j * k4)] >> (2 * j)) & 3) - 1 for j in range(4) if j * k4 < k]
    codes = jnp.concatenate(slabs, axis=0).astype(jnp.int8)
    if shape is not None:
        codes = codes[:, : shape[1]]
    return codes


def pack(w: jax.Array, k_align: int = K_ALIGN, n_align: int = N_ALIGN) -> PackedTernary:
    """Absmean-ternarise a latent weight `[K, N]` (SPECS §1) and pack it."""
    codes, scale = quant.ternary_codes(w)
    return PackedTernary(pack_codes(codes, k_align, n_align), scale, tuple(w.shape))


def unpack(p: PackedTernary) -> jax.Array:
    """The dequantised weight `[K, N]` float32: codes * scale (equals quantize_weights(w))."""
    return unpack_codes(p.codes, p.shape).astype(jnp.float32) * p.scale
