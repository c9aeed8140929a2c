"""The Pallas ternary matmul (interpret mode on CPU) against its jnp reference twin."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from nanochat_jax.ternary import kernel, packing

# (M, K, N): decode rows, odd sizes, aligned sizes, several K steps per tile
SHAPES = [(1, 128, 32), (5, 100, 70), (16, 256, 64), (33, 384, 96), (64, 512, 128)]


def _operands(m, k, n, seed=0, dtype=jnp.int8):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
    w = packing.PackedTernary(packing.pack_codes(jnp.asarray(codes)), jnp.float32(1.0), (k, n))
    if dtype == jnp.int8:
        x = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
    else:
        x = rng.normal(size=(m, k)).astype(np.float32)
    return jnp.asarray(x, dtype), w, codes


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_int32_accumulator_equals_reference_bit_for_bit(shape):
    x, w, codes = _operands(*shape)
    out = kernel.ternary_matmul(x, w, impl="interpret")
    ref = kernel.ternary_matmul(x, w, impl="reference")
    assert out.dtype == ref.dtype == jnp.int32 and out.shape == (shape[0], shape[2])
    assert_array_equal(np.asarray(out), np.asarray(ref))
    assert_array_equal(np.asarray(ref), np.asarray(x, np.int64) @ codes.astype(np.int64))


@pytest.mark.parametrize("blocks", [(16, 32, 32), (32, 64, 64), (16, 32, 128)])
def test_every_tiling_gives_the_same_exact_result(blocks):
    x, w, _ = _operands(40, 512, 128, seed=2)  # K4 = 128: up to 4 K steps per tile
    out = kernel.ternary_matmul(x, w, impl="interpret", blocks=blocks)
    assert_array_equal(np.asarray(out), np.asarray(kernel.ternary_matmul_reference(x, w)))


def test_extreme_int8_values_accumulate_exactly_in_int32():
    x = jnp.full((16, 1024), -127, jnp.int8)
    codes = jnp.full((1024, 32), -1, jnp.int8)
    w = packing.PackedTernary(packing.pack_codes(codes), jnp.float32(1.0), (1024, 32))
    out = kernel.ternary_matmul(x, w, impl="interpret")
    assert_array_equal(np.asarray(out), np.full((16, 32), 127 * 1024, np.int32))


@pytest.mark.parametrize("shape", [(5, 100, 70), (32, 256, 64)])
def test_float_activation_variant_matches_reference(shape):
    x, w, codes = _operands(*shape, dtype=jnp.float32)
    out = kernel.ternary_matmul(x, w, impl="interpret")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(x) @ codes.astype(np.float32),
                               rtol=1e-5, atol=1e-4)


def test_auto_uses_the_reference_on_cpu_and_bad_impls_are_rejected():
    assert kernel.resolve_impl("auto") == "reference"
    assert kernel.resolve_impl("auto", "tpu") == kernel.resolve_impl("auto", "gpu") == "pallas"
    with pytest.raises(ValueError, match="choose one of"):
        kernel.resolve_impl("triton")
    x, w, _ = _operands(4, 128, 32)
    with pytest.raises(ValueError, match="wants x"):
        kernel.ternary_matmul(x[:, :64], w)
    with pytest.raises(ValueError, match="choose one of"):
        kernel.ternary_matmul(x, w, impl="triton")


def test_auto_follows_the_mesh_platform_not_the_host():
    """On a CPU mesh 'auto' stages no kernel; with no mesh the lowering decides
    (platform_dependent); 'pallas' on a CPU mesh is refused with the way out."""
    x, w, _ = _operands(8, 128, 32)
    mesh = jax.make_mesh((1,), ("data",))
    with jax.set_mesh(mesh):
        traced = str(jax.make_jaxpr(lambda a: kernel.ternary_matmul(a, w))(x))
        with pytest.raises(ValueError, match="use 'auto' or 'interpret'"):
            kernel.ternary_matmul(x, w, impl="pallas")
    assert "pallas_call" not in traced and "platform_index" not in traced
    unplaced = str(jax.make_jaxpr(lambda a: kernel.ternary_matmul(a, w))(x))
    assert "platform_index" in unplaced and "pallas_call" in unplaced


def test_tilings_follow_each_lowering_rules():
    """Mosaic: multiples of 128 (or a whole dimension) along lanes, rows in 32s; Triton:
    powers of two that divide the packed shape."""
    for m, k4, n_p in [(1, 32, 32), (1000, 96, 160), (64, 2752, 11008), (4096, 512, 768)]:
        for bm, bk4, bn in kernel.TRITON.candidates(m, k4, n_p):
            assert k4 % bk4 == 0 and n_p % bn == 0 and bm >= 16
            assert all(b & (b - 1) == 0 for b in (bm, bk4, bn))
        for bm, bk4, bn in kernel.MOSAIC.candidates(m, k4, n_p):
            assert bm % 32 == 0 and k4 % bk4 == 0 and n_p % bn == 0
            assert bk4 % 128 == 0 or bk4 == k4
            assert bn % 128 == 0 or bn == n_p
        for tiling in (kernel.MOSAIC, kernel.TRITON):
            bm, bk4, bn = tiling.default(m, k4, n_p)
            assert bm in tiling.bm and any(c[1:] == (bk4, bn)
                                           for c in tiling.candidates(m, k4, n_p))
    assert kernel.MOSAIC.default(1, 192, 768) == (32, 192, 256)  # K4 192: one whole-K step
    assert {bm for bm, _, _ in kernel.TRITON.candidates(1, 64, 64)} == {16}  # decode: 1 tile
    with pytest.raises(ValueError, match="not a mosaic tiling"):
        kernel._pallas_matmul(jnp.zeros((8, 768), jnp.int8), jnp.zeros((192, 768), jnp.uint8),
                              (32, 64, 256), "mosaic")


def test_int8_products_through_bf16_dots_stay_exact():
    """Chips without an int8 matrix unit (TPU v2-v4) get bf16 dots with fp32 accumulation:
    the same int32 result, here at the extremes (|acc| = 127 K)."""
    x, w, codes = _operands(40, 768, 256, seed=4)
    extreme = jnp.full((8, 2048), -127, jnp.int8)
    w_extreme = packing.PackedTernary(packing.pack_codes(jnp.full((2048, 32), -1, jnp.int8)),
                                      jnp.float32(1.0), (2048, 32))
    for a, b in ((x, w), (extreme, w_extreme)):
        out = kernel._pallas_matmul(a, b.codes, kernel.MOSAIC.default(a.shape[0], *b.codes.shape),
                                    "interpret", int8_dots=False)[:, : b.shape[1]]
        assert out.dtype == jnp.int32
        assert_array_equal(np.asarray(out), np.asarray(kernel.ternary_matmul_reference(a, b)))


def test_every_mosaic_tiling_is_exact_in_interpret_mode():
    """The TPU layout (slabs of x at multiples of 128, whole-K steps) computes the product."""
    x, w, _ = _operands(40, 768, 256, seed=3)  # K4 = 192: not a multiple of 128
    ref = np.asarray(kernel.ternary_matmul_reference(x, w))
    for blocks in kernel.MOSAIC.candidates(40, *w.codes.shape):
        out = kernel.ternary_matmul(x, w, impl="interpret", blocks=blocks)
        assert_array_equal(np.asarray(out), ref)


def test_tiles_are_looked_up_while_tracing_and_tuned_only_on_concrete_arrays(tmp_path,
                                                                            monkeypatch):
    """A trace takes the cached tiling or the default (noting the shape as pending), never
    times anything; tune_pending times the pending shapes afterwards and caches the winner
    in memory and on disk; a new process finds it on disk."""
    calls = []
    real = kernel._pallas_matmul

    def counting(x, codes, blocks, lowering, int8_dots=True):
        calls.append(blocks)
        return real(x, codes, blocks, lowering, int8_dots)

    monkeypatch.setattr(kernel, "_pallas_matmul", counting)
    monkeypatch.setattr(kernel, "_TUNED", {})
    monkeypatch.setattr(kernel, "_PENDING", {})
    cache = str(tmp_path / "tune.json")
    kind = jax.devices()[0].device_kind
    traced = jax.jit(lambda: kernel.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 128, jnp.int8,
                                                  cache_path=cache) and jnp.zeros(()))
    traced()
    assert calls == [] and len(kernel.pending()) == 1
    with pytest.raises(RuntimeError, match="before a step is traced"):
        jax.jit(lambda: kernel.tune_shape(kernel.MOSAIC, 8, 32, 128, jnp.int8) and 0)()

    done = kernel.tune_pending(cache_path=cache, repeats=1)
    (key, best), = done.items()
    assert best in kernel.MOSAIC.candidates(8, 32, 128) and set(calls) == set(
        kernel.MOSAIC.candidates(8, 32, 128))
    assert kernel.pending() == [] and json.loads(open(cache).read()) == {key: list(best)}

    calls.clear()
    monkeypatch.setattr(kernel, "_TUNED", {})  # a new process: only the disk cache remains
    assert kernel.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 128, jnp.int8,
                                cache_path=cache) == best
    assert calls == [] and kernel.pending() == []
    # a cache entry this lowering cannot run (a stale file) is not used: retuned instead
    open(cache, "w").write(json.dumps({key: [32, 64, 128]}))
    monkeypatch.setattr(kernel, "_TUNED", {})
    assert kernel.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 128, jnp.int8,
                                cache_path=cache) == kernel.MOSAIC.default(8, 32, 128)
    assert kernel.pending() == [key]


@pytest.mark.skipif(jax.default_backend() == "cpu",
                    reason="needs a GPU or TPU: the compiled Pallas lowering (CPU runs the "
                           "same kernel in interpret mode above)")
@pytest.mark.parametrize("shape", SHAPES + [(1, 4096, 4096), (256, 2048, 5632)])
def test_compiled_kernel_equals_reference_on_the_accelerator(shape):
    x, w, _ = _operands(*shape)
    out = kernel.ternary_matmul(x, w, impl="pallas")  # autotuned tiling
    assert_array_equal(np.asarray(out), np.asarray(kernel.ternary_matmul_reference(x, w)))
    xf, wf, codes = _operands(*shape, dtype=jnp.float32)
    ref = np.asarray(xf) @ codes.astype(np.float32)
    got = np.asarray(kernel.ternary_matmul(xf, wf, impl="pallas"))
    assert np.max(np.abs(got - ref)) <= 1e-2 * np.max(np.abs(ref))  # TF32 dots allowed
