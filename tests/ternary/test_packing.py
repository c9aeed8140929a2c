"""I2 packing (docs/techniques.md#packing): exact round trips, 2 bits per weight, padding that means
zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from nanochat_jax.ternary import packing, quant


def _codes(k, n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(-1, 2, size=(k, n)), jnp.int8)


@pytest.mark.parametrize("shape", [(4, 1), (128, 32), (100, 70), (3, 5), (768, 96)])
def test_pack_unpack_round_trips_exactly(shape):
    codes = _codes(*shape)
    packed = packing.pack_codes(codes)
    assert packed.dtype == jnp.uint8
    assert_array_equal(np.asarray(packing.unpack_codes(packed, shape)), np.asarray(codes))


def test_packed_shape_is_a_quarter_of_k_padded_to_the_alignment():
    packed = packing.pack_codes(_codes(100, 70))
    assert packed.shape == (32, 96)  # ceil(100/4)=25 -> 32 rows; 70 -> 96 columns
    assert packing.pack_codes(_codes(256, 64)).shape == (64, 64)  # aligned: exactly K/4


def test_padding_decodes_to_zero_weights():
    full = np.asarray(packing.unpack_codes(packing.pack_codes(_codes(100, 70))))
    assert full.shape == (128, 96)
    assert not full[100:].any() and not full[:, 70:].any()


def test_byte_layout_puts_slab_j_in_bits_2j():
    """Byte (i, n) holds rows i + j*K4 for j = 0..3 as code = w + 1 in bits 2j..2j+1."""
    k4 = packing.K_ALIGN
    codes = np.zeros((4 * k4, 1), np.int8)
    codes[0 * k4 + 3, 0], codes[1 * k4 + 3, 0] = 1, -1  # byte row 3: slab0 -> 2, slab1 -> 0
    codes[2 * k4 + 3, 0], codes[3 * k4 + 3, 0] = 1, 0  # slab2 -> 2, slab3 -> 1
    packed = np.asarray(packing.pack_codes(jnp.asarray(codes)))
    assert packed[3, 0] == 2 | (0 << 2) | (2 << 4) | (1 << 6)
    assert packed[0, 0] == 0b01010101  # all zeros -> code 1 in every slot


def test_packed_weights_cost_two_bits_each():
    w = jnp.ones((1024, 512), jnp.float32)
    p = packing.pack(w)
    assert p.nbytes == 1024 * 512 // 4 + 4  # codes + one fp32 scale


def test_pack_then_unpack_equals_quantize_weights():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(96, 40)), jnp.float32)
    p = packing.pack(w)
    assert p.shape == (96, 40)
    np.testing.assert_array_equal(np.asarray(packing.unpack(p)),
                                  np.asarray(quant.quantize_weights(w)))


def test_packed_ternary_is_a_pytree_with_static_shape():
    p = packing.pack(jnp.ones((8, 8)))
    leaves, treedef = jax.tree.flatten(p)
    assert len(leaves) == 2  # codes and scale; the logical shape is static metadata
    q = jax.tree.unflatten(treedef, leaves)
    assert q.shape == (8, 8)
    doubled = jax.jit(lambda t: t.replace(scale=t.scale * 2))(p)
    assert float(doubled.scale) == 2 * float(p.scale) and doubled.shape == (8, 8)


@pytest.mark.parametrize("shape", [(128, 32), (100, 70), (768, 200)])
def test_cpu_tiles_hold_the_same_bytes_and_round_trip(shape):
    codes = packing.pack_codes(_codes(*shape, seed=3))  # [K4, Np]
    tiles = packing.cpu_tiles(codes)
    k4, n_p = codes.shape
    assert tiles.shape == (-(-n_p // 64), k4 // 4, 256) and tiles.dtype == jnp.uint8
    back = np.asarray(packing.from_cpu_tiles(tiles))
    assert_array_equal(back[:, :n_p], np.asarray(codes))
    assert (back[:, n_p:] == packing.PAD_BYTE).all()  # padding columns: weights 0


def test_cpu_tile_byte_order():
    """tiles[b, g, 4 c + t] = I2 byte (4 g + t, 64 b + c)."""
    codes = jnp.asarray(np.random.default_rng(4).integers(0, 256, size=(64, 128)), jnp.uint8)
    tiles = np.asarray(packing.cpu_tiles(codes))
    for b, g, c, t in [(0, 0, 0, 0), (1, 3, 5, 2), (0, 15, 63, 3), (1, 7, 17, 1)]:
        assert tiles[b, g, 4 * c + t] == codes[4 * g + t, 64 * b + c]


def test_layout_is_static_and_unpack_reads_either():
    w = jnp.asarray(np.random.default_rng(5).normal(size=(96, 40)), jnp.float32)
    i2 = packing.pack(w)
    tiled = packing.to_layout(i2, "cpu_tiles")
    assert tiled.layout == "cpu_tiles" and tiled.shape == (96, 40)
    assert len(jax.tree.leaves(tiled)) == 2
    assert_array_equal(np.asarray(packing.unpack(tiled)), np.asarray(packing.unpack(i2)))
    assert packing.to_layout(tiled, "i2").codes.shape[0] == i2.codes.shape[0]
    with pytest.raises(ValueError, match="layout"):
        packing.to_layout(i2, "tq2_0")
