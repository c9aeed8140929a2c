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
    with pytest.raises(ValueError, match="choose one of"):
        kernel.resolve_impl("triton")
    x, w, _ = _operands(4, 128, 32)
    with pytest.raises(ValueError, match="wants x"):
        kernel.ternary_matmul(x[:, :64], w)


def test_candidate_tilings_are_powers_of_two_that_divide_the_packed_shape():
    for m, k4, n_p in [(1, 32, 32), (1000, 96, 160), (64, 2752, 11008)]:
        cands = kernel.candidate_blocks(m, k4, n_p)
        assert cands
        for bm, bk4, bn in cands:
            assert k4 % bk4 == 0 and n_p % bn == 0
            assert all(b & (b - 1) == 0 for b in (bm, bk4, bn))
    assert {bm for bm, _, _ in kernel.candidate_blocks(1, 64, 64)} == {16}  # decode: one tile


def test_autotuner_times_once_then_caches_in_memory_and_on_disk(tmp_path, monkeypatch):
    calls = []
    real = kernel._pallas_matmul

    def counting(x, w, blocks, interpret):
        calls.append(blocks)
        return real(x, w, blocks, interpret)

    monkeypatch.setattr(kernel, "_pallas_matmul", counting)
    monkeypatch.setattr(kernel, "_TUNED", {})
    cache = tmp_path / "tune.json"
    cands = [(16, 32, 32), (16, 32, 64)]
    best = kernel.choose_blocks(8, 32, 64, jnp.int8, interpret=True, candidates=cands,
                                cache_path=str(cache), repeats=1)
    assert best in cands and set(calls) == set(cands)
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [list(best)]

    calls.clear()
    assert kernel.choose_blocks(8, 32, 64, jnp.int8, interpret=True, candidates=cands,
                                cache_path=str(cache)) == best
    monkeypatch.setattr(kernel, "_TUNED", {})  # a new process: only the disk cache remains
    assert kernel.choose_blocks(8, 32, 64, jnp.int8, interpret=True, candidates=cands,
                                cache_path=str(cache)) == best
    assert calls == []  # neither lookup timed anything


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
