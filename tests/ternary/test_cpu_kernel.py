"""The native CPU ternary kernel (cpu_kernel.cc via XLA FFI): exact int32 products from CPU
tiles for any row count, chosen by 'auto' on the CPU for I2 codes and CPU tiles alike, and a
clear fallback when it cannot be built."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from nanochat_jax.ternary import cpu_kernel, kernel, packing

# The handler is registered for XLA:CPU only: on a GPU/TPU host the arrays live elsewhere.
pytestmark = pytest.mark.cpu_only("the native CPU kernel (cpu_kernel.cc)")

needs_kernel = pytest.mark.skipif(
    not cpu_kernel.available(),
    reason=f"no CPU ternary kernel on this host ({cpu_kernel.why() or 'see cpu_kernel.py'})")

# (M, K, N): K below 4 K4 (padding rows), N a multiple of 32 but not 64 (a padded last
# block), row counts off the 4-row tile and the 16-row unit, calls long enough to be shared
# with XLA's pool (M K4 Np >= 2^22: the last two)
SHAPES = [(1, 128, 32), (1, 768, 2048), (3, 100, 70), (8, 256, 96), (9, 384, 160),
          (64, 2048, 96), (130, 200, 64), (37, 2048, 2048), (64, 768, 1024)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernel_equals_the_integer_product_bit_for_bit(shape):
    m, k, n = shape
    rng = np.random.default_rng(m + k + n)
    codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
    x = rng.integers(-128, 128, size=(m, k)).astype(np.int8)  # -128 too: no saturation
    tiles = packing.cpu_tiles(packing.pack_codes(jnp.asarray(codes)))
    out = jax.jit(cpu_kernel.matmul)(jnp.asarray(x), tiles)
    assert out.dtype == jnp.int32 and out.shape == (m, 64 * tiles.shape[0])
    assert_array_equal(np.asarray(out)[:, :n], x.astype(np.int64) @ codes.astype(np.int64))


@needs_kernel
@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_auto_on_the_cpu_runs_the_native_kernel_for_int8_activations(layout):
    rng = np.random.default_rng(0)
    i2 = packing.pack(jnp.asarray(rng.normal(size=(256, 96)), jnp.float32))
    w = packing.to_layout(i2, layout)
    x = jnp.asarray(rng.integers(-127, 128, size=(2, 256)), jnp.int8)
    hlo = jax.jit(lambda a: kernel.ternary_matmul(a, w)).lower(x).as_text()
    assert cpu_kernel.TARGET in hlo
    product = np.asarray(kernel.ternary_matmul(x, w))
    chex.assert_shape(product, (2, 96))
    assert_array_equal(product, np.asarray(kernel.ternary_matmul(x, i2, impl="reference")))
    assert_array_equal(product, np.asarray(kernel.ternary_matmul(x, w, impl="reference")))
    floats = jnp.asarray(x, jnp.float32)  # float activations keep XLA's dot
    assert cpu_kernel.TARGET not in jax.jit(
        lambda a: kernel.ternary_matmul(a, w)).lower(floats).as_text()


def test_bad_operands_are_refused_with_their_shapes():
    tiles = jnp.zeros((1, 8, 256), jnp.uint8)  # K up to 128
    with pytest.raises(ValueError, match="int8 x"):
        cpu_kernel.matmul(jnp.zeros((1, 128), jnp.float32), tiles)
    with pytest.raises(ValueError, match="CPU tiles"):  # I2 codes are not tiles
        cpu_kernel.matmul(jnp.zeros((1, 128), jnp.int8), jnp.zeros((32, 64), jnp.uint8))
    with pytest.raises(ValueError, match="columns"):
        cpu_kernel.matmul(jnp.zeros((1, 256), jnp.int8), tiles)
    tiled = packing.to_layout(packing.pack(jnp.ones((128, 64))), "cpu_tiles")
    with pytest.raises(ValueError, match="CPU tiles"):
        kernel.ternary_matmul(jnp.zeros((1, 128), jnp.int8), tiled, impl="interpret")


def test_without_a_compiler_the_kernel_is_unavailable_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not cpu_kernel.available()
    assert "no-such-compiler" in cpu_kernel.why()
    assert cpu_kernel.instruction_path() == "unavailable"
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_kernel.matmul(jnp.zeros((1, 128), jnp.int8), jnp.zeros((1, 8, 256), jnp.uint8))
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setenv(cpu_kernel.SWITCH_ENV, "0")
    assert not cpu_kernel.available() and cpu_kernel.why() == f"{cpu_kernel.SWITCH_ENV}=0"
