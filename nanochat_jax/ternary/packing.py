"""I2: ternary weights packed 4 per byte (docs/techniques.md#packing), the kernel's weight format.

Layout of a logical `[K, N]` weight (Flax `[in, out]`): K is padded to `4 * K4` rows, with
`K4` a multiple of `k_align`, and N to a multiple of `n_align` (padding codes mean 0). Byte
`(i, n)` of the packed `[K4, Np]` uint8 array holds rows `i + j * K4` for `j = 0..3` in
bits `2j..2j+1`, as `code = w + 1` in {0, 1, 2}. So every byte row serves four K-slabs, and
unpacking a `[bk4, bn]` tile gives four `[bk4, bn]` weight tiles that multiply four
`[bm, bk4]` slices of x: no interleaving, and any K tile size dividing `K4` works on the
same packed array.

CPU tiles (`cpu_tiles`) hold the same bytes in the order the CPU kernel (cpu_kernel.cc)
streams them: `[NB, K4 / 4, 256]`, block `b` holding columns `64b .. 64b + 63` over all of
K, and `tiles[b, g, 4 c + t]` = byte `(4 g + t, 64 b + c)`. A `PackedTernary` says which
order its codes are in (`layout`); `model.packed.for_cpu` reorders a packed model once.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from nanochat_jax.ternary import quant

K_ALIGN = 32  # packed rows are padded to a multiple of this (K to a multiple of 128)
N_ALIGN = 32
TILE_COLUMNS = 64  # columns per CPU tile block
LAYOUTS = ("i2", "cpu_tiles")
PAD_BYTE = 0b01010101  # four codes w + 1 = 1: weights 0


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@flax.struct.dataclass
class PackedTernary:
    """Packed ternary weight: `codes` uint8 (`[K4, Np]` in the I2 layout, `[NB, K4/4, 256]`
    as CPU tiles), multiplier `scale` (g = mean|W|), the logical `[K, N]` shape and the
    layout. W ~ unpack(codes)[:K, :N] * scale."""

    codes: jax.Array  # [K4, Np] uint8 (i2) or [NB, K4 / 4, 256] uint8 (cpu_tiles)
    scale: jax.Array  # [] float32
    shape: tuple[int, int] = flax.struct.field(pytree_node=False)
    layout: str = flax.struct.field(pytree_node=False, default="i2")

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


def cpu_tiles(codes: jax.Array) -> jax.Array:
    """I2 codes `[K4, Np]` -> CPU tiles `[ceil(Np / 64), K4 / 4, 256]` (layout above; the
    columns past Np hold weights 0). K4 must be a multiple of 4 (pack's K_ALIGN is)."""
    k4, n_p = codes.shape
    if k4 % 4:
        raise ValueError(f"CPU tiles group packed rows by 4; these codes have {k4} rows")
    blocks = -(-n_p // TILE_COLUMNS)
    padded = jnp.pad(codes, ((0, 0), (0, blocks * TILE_COLUMNS - n_p)), constant_values=PAD_BYTE)
    grouped = padded.reshape(k4 // 4, 4, blocks, TILE_COLUMNS)  # [g, t, b, c]
    return grouped.transpose(2, 0, 3, 1).reshape(blocks, k4 // 4, 4 * TILE_COLUMNS)


def from_cpu_tiles(tiles: jax.Array) -> jax.Array:
    """CPU tiles `[NB, G, 256]` -> I2 codes `[4 G, 64 NB]` (the inverse of `cpu_tiles`, up
    to its padding columns)."""
    blocks, groups, _ = tiles.shape
    grouped = tiles.reshape(blocks, groups, TILE_COLUMNS, 4)  # [b, g, c, t]
    return grouped.transpose(1, 3, 0, 2).reshape(4 * groups, blocks * TILE_COLUMNS)


def to_layout(p: PackedTernary, layout: str) -> PackedTernary:
    """The same weight with its codes in `layout` ('i2' or 'cpu_tiles')."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r}: choose one of {LAYOUTS}")
    if layout == p.layout:
        return p
    codes = cpu_tiles(p.codes) if layout == "cpu_tiles" else from_cpu_tiles(p.codes)
    return PackedTernary(codes, p.scale, p.shape, layout)


def i2_codes(p: PackedTernary) -> jax.Array:
    """The codes of `p` in the I2 layout `[K4, Np']` (reordered if they are CPU tiles)."""
    return p.codes if p.layout == "i2" else from_cpu_tiles(p.codes)


def pack(w: jax.Array, k_align: int = K_ALIGN, n_align: int = N_ALIGN) -> PackedTernary:
    """Absmean-ternarise a latent weight `[K, N]` (docs/techniques.md#bitnet) and pack it."""
    codes, scale = quant.ternary_codes(w)
    return PackedTernary(pack_codes(codes, k_align, n_align), scale, tuple(w.shape))


def unpack(p: PackedTernary) -> jax.Array:
    """The dequantised weight `[K, N]` float32: codes * scale (equals quantize_weights(w))."""
    return unpack_codes(i2_codes(p), p.shape).astype(jnp.float32) * p.scale
