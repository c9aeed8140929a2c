"""The Pallas ternary matmul (interpret mode on CPU) against its jnp reference twin."""

import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from numpy.testing import assert_array_equal

from nanochat_jax.ternary import kernel, packing, tile_cache, tiling, tuning

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


def test_auto_follows_the_platform_and_bad_impls_are_rejected():
    """'auto' is the kernel where one compiles (GPU, TPU) and the reference elsewhere; this
    host's own answer follows its backend."""
    on_accelerator = jax.default_backend() in kernel.TILINGS
    assert kernel.resolve_impl("auto") == ("pallas" if on_accelerator else "reference")
    assert kernel.resolve_impl("auto", "cpu") == "reference"
    assert kernel.resolve_impl("auto", "tpu") == kernel.resolve_impl("auto", "gpu") == "pallas"
    with pytest.raises(ValueError, match="choose one of"):
        kernel.resolve_impl("triton")
    x, w, _ = _operands(4, 128, 32)
    with pytest.raises(ValueError, match="wants x"):
        kernel.ternary_matmul(x[:, :64], w)
    with pytest.raises(ValueError, match="choose one of"):
        kernel.ternary_matmul(x, w, impl="triton")


def test_auto_follows_the_mesh_platform_not_the_host():
    """On a one-device mesh 'auto' stages the kernel exactly when the mesh's devices compile
    one (GPU/TPU), never on a CPU mesh; with no mesh the lowering decides
    (platform_dependent); 'pallas' on a CPU mesh is refused with the way out."""
    x, w, _ = _operands(8, 128, 32)
    mesh = jax.make_mesh((1,), ("data",))
    accelerator = mesh.devices.flat[0].platform in kernel.TILINGS
    with jax.set_mesh(mesh):
        traced = str(jax.make_jaxpr(lambda a: kernel.ternary_matmul(a, w))(x))
        if not accelerator:
            with pytest.raises(ValueError, match="use 'auto' or 'interpret'"):
                kernel.ternary_matmul(x, w, impl="pallas")
    assert ("pallas_call" in traced) == accelerator and "platform_index" not in traced
    unplaced = str(jax.make_jaxpr(lambda a: kernel.ternary_matmul(a, w))(x))
    assert "platform_index" in unplaced and "pallas_call" in unplaced


def test_tilings_follow_each_lowering_rules():
    """Mosaic: multiples of 128 (or a whole dimension) along lanes, rows in 32s, K whole;
    Triton: powers of two that divide the packed shape (a decode product's K share too)."""
    for m, k4, n_p in [(1, 32, 32), (1000, 96, 160), (64, 2752, 11008), (4096, 512, 768),
                       (8, 192, 768), (16, 1024, 4096)]:
        for bm, bk4, bn, split, _, _ in kernel.TRITON.candidates(m, k4, n_p):
            assert k4 % split == 0 and (k4 // split) % bk4 == 0 and n_p % bn == 0
            assert bm >= 16 and all(b & (b - 1) == 0 for b in (bm, bk4, bn))
            assert split == 1 or m <= tiling.DECODE_ROWS
        for bm, bk4, bn, split, _, _ in kernel.MOSAIC.candidates(m, k4, n_p):
            assert bm % 32 == 0 and k4 % bk4 == 0 and n_p % bn == 0 and split == 1
            assert bk4 % 128 == 0 or bk4 == k4
            assert bn % 128 == 0 or bn == n_p
        for t in (kernel.MOSAIC, kernel.TRITON):
            default = t.default(m, k4, n_p)
            assert t.accepts(default, k4, n_p)
            assert default.bm in t.bm and any(c[1:4] == default[1:4]
                                              for c in t.candidates(m, k4, n_p))
    assert kernel.MOSAIC.default(1, 192, 768)[:3] == (32, 192, 256)  # K4 192: one whole-K step
    assert {b.bm for b in kernel.TRITON.candidates(1, 64, 64)} == {16}  # decode: 1 row tile
    with pytest.raises(ValueError, match="not a mosaic tiling"):
        kernel.pallas_matmul(jnp.zeros((8, 768), jnp.int8), jnp.zeros((192, 768), jnp.uint8),
                              (32, 64, 256), "mosaic")
    with pytest.raises(ValueError, match="not a mosaic tiling"):  # Mosaic never splits K
        kernel.pallas_matmul(jnp.zeros((8, 768), jnp.int8), jnp.zeros((192, 768), jnp.uint8),
                              (32, 192, 256, 2), "mosaic")


def test_decode_tilings_give_every_streaming_multiprocessor_work():
    """A [1, 4096] x [4096, 4096] product in 128-column tiles was 32 programs for an H100's
    132 SMs: decode candidates offer 32-column tiles and K splits, the default aims at two
    programs per SM, and training shapes keep K whole."""
    k4, n_p = 1024, 4096
    decode = kernel.TRITON.candidates(1, k4, n_p)
    assert {b.bn for b in decode} == {32, 64, 128} and {b.split_k for b in decode} >= {1, 2, 8}
    assert max((n_p // b.bn) * b.split_k for b in decode) >= 2 * 132
    default = kernel.TRITON.default(1, k4, n_p)
    assert (n_p // default.bn) * default.split_k >= tiling.DECODE_PROGRAMS
    assert {b.split_k for b in kernel.TRITON.candidates(4096, k4, n_p)} == {1}
    assert kernel.TRITON.default(4096, k4, n_p).split_k == 1


@pytest.mark.parametrize("blocks", [(16, 32, 32, 2), (16, 64, 64, 3), (32, 32, 32, 6)])
def test_split_k_adds_exact_int32_partial_sums(blocks):
    """Programs that share an output tile along K each sum their K4 / split_k packed rows;
    the partial sums add up exactly, at odd shapes and at the int8 extremes."""
    x, w, _ = _operands(5, 760, 120, seed=7)  # K4 = 192: shares of 96, 64 and 32 rows
    out = kernel.pallas_matmul(x, w.codes, blocks, "interpret")[:, :120]
    assert_array_equal(np.asarray(out), np.asarray(kernel.ternary_matmul_reference(x, w)))
    extreme = jnp.full((3, 1024), -127, jnp.int8)
    w_extreme = packing.PackedTernary(packing.pack_codes(jnp.full((1024, 32), -1, jnp.int8)),
                                      jnp.float32(1.0), (1024, 32))
    out = kernel.pallas_matmul(extreme, w_extreme.codes, (16, 32, 32, 4), "interpret")
    assert_array_equal(np.asarray(out), np.full((3, 32), 127 * 1024, np.int32))


def test_the_alignment_hint_holds_for_every_offset_the_kernel_reads():
    """`pl.multiple_of` promises the compiler an alignment of x's column offsets: true for
    every slab, K share and K step of every tiling either lowering may use (it promised
    192 for Mosaic's whole-K step at K4 = 192, whose slabs start at 256, 512, 768)."""
    for k4, n_p in [(192, 768), (96, 256), (1024, 4096), (2752, 11008), (512, 2048)]:
        for t in (kernel.MOSAIC, kernel.TRITON):
            stride = -(-k4 // t.lane) * t.lane
            for m in (1, 4096):
                for blocks in t.candidates(m, k4, n_p) + [t.default(m, k4, n_p)]:
                    align = tiling.slab_alignment(k4, blocks, stride)
                    share = k4 // blocks.split_k
                    offsets = {j * stride + s * share + kb * blocks.bk4
                               for j in range(4) for s in range(blocks.split_k)
                               for kb in range(share // blocks.bk4)}
                    assert all(o % align == 0 for o in offsets), (k4, blocks, align)
                    assert align & (align - 1) == 0
    assert tiling.slab_alignment(192, kernel.MOSAIC.default(1, 192, 768), 256) == 256
    # and the kernel passes it on: the hints in the traced program (interpret mode lays x out
    # as Mosaic does: slabs at multiples of 128) are the slab alignment and bk4, no other
    x = jax.ShapeDtypeStruct((8, 768), jnp.int8)
    codes = jax.ShapeDtypeStruct((192, 768), jnp.uint8)
    for blocks in [kernel.MOSAIC.default(8, 192, 768), kernel.Blocks(16, 64, 64),
                   kernel.Blocks(16, 32, 64, 3)]:
        traced = str(jax.make_jaxpr(
            lambda a, c, b=blocks: kernel.pallas_matmul(a, c, b, "interpret"))(x, codes))
        hints = {int(v) for v in re.findall(r"multiple_of\[values=\((\d+),\)\]", traced)}
        assert hints == {tiling.slab_alignment(192, blocks, 256), blocks.bk4}, blocks


def test_explicit_blocks_work_without_a_mesh_and_are_checked_against_every_lowering():
    """With no mesh the product is lowered for every platform: blocks go to the lowering
    whose rules they follow (here Triton's), the others take their own tiles; blocks no
    lowering accepts are refused."""
    x, w, codes = _operands(8, 256, 64)
    got = jax.jit(lambda a: kernel.ternary_matmul(a, w, blocks=(16, 32, 32, 2)))(x)
    assert_array_equal(np.asarray(got), np.asarray(x, np.int64) @ codes.astype(np.int64))
    exported = export.export(
        jax.jit(lambda a: kernel.ternary_matmul(a, w, impl="pallas", blocks=(16, 32, 32))),
        platforms=("tpu",))(jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert "tpu_custom_call" in exported.mlir_module()  # Mosaic, with its own tiling
    with pytest.raises(ValueError, match="not a mosaic or triton tiling"):
        kernel.ternary_matmul(x, w, blocks=(16, 48, 32))
    with pytest.raises(ValueError, match="bm, bk4, bn"):
        kernel.ternary_matmul(x, w, blocks=(16, 32))


def test_the_shared_memory_rule_refuses_what_an_h100_cannot_hold():
    """bf16 activations at (128, 128, *) asked an H100 for 286,720-360,448 bytes of shared
    memory (232,448 available): the rule keeps them from the tuner; every int8 tiling of
    the same shape stays (the largest asked for 196,608)."""
    h100 = tiling.gpu_of(types.SimpleNamespace(compute_capability="9.0"))
    assert h100 == ((9, 0), 232448)
    k4, n_p = 1024, 11008  # (4096, 4096, 11008)
    refused = [b for b in kernel.TRITON.candidates(4096, k4, n_p, jnp.bfloat16)
               if b not in kernel.TRITON.candidates(4096, k4, n_p, jnp.bfloat16, h100)]
    assert {tuple(b[:3]) for b in refused} == {(128, 128, 64), (128, 128, 128), (128, 128, 256)}
    assert kernel.TRITON.candidates(4096, k4, n_p, jnp.int8, h100) == \
        kernel.TRITON.candidates(4096, k4, n_p, jnp.int8)
    a100 = tiling.gpu_of(types.SimpleNamespace(compute_capability="8.0"))
    assert a100.shared_memory == 166912 and tiling.gpu_of(jax.devices("cpu")[0]) is None


def test_int8_products_through_bf16_dots_stay_exact():
    """Chips without an int8 matrix unit (TPU v2-v4) get bf16 dots with fp32 accumulation:
    the same int32 result, here at the extremes (|acc| = 127 K)."""
    x, w, codes = _operands(40, 768, 256, seed=4)
    extreme = jnp.full((8, 2048), -127, jnp.int8)
    w_extreme = packing.PackedTernary(packing.pack_codes(jnp.full((2048, 32), -1, jnp.int8)),
                                      jnp.float32(1.0), (2048, 32))
    for a, b in ((x, w), (extreme, w_extreme)):
        out = kernel.pallas_matmul(a, b.codes, kernel.MOSAIC.default(a.shape[0], *b.codes.shape),
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
    real = kernel.pallas_matmul

    def counting(x, codes, blocks, lowering, int8_dots=True):
        calls.append(blocks)
        return real(x, codes, blocks, lowering, int8_dots)

    monkeypatch.setattr(kernel, "pallas_matmul", counting)
    monkeypatch.setattr(tile_cache, "_TUNED", {})
    monkeypatch.setattr(tile_cache, "_PENDING", {})
    cache = str(tmp_path / "tune.json")
    kind = jax.devices()[0].device_kind
    lowering = tuning.local_lowering(kernel.MOSAIC)  # what the tuner keys its timings by
    traced = jax.jit(lambda: tile_cache.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 128, jnp.int8,
                                                      cache_path=cache, lowering=lowering)
                     and jnp.zeros(()))
    traced()
    assert calls == [] and len(tile_cache.pending()) == 1
    with pytest.raises(RuntimeError, match="before a step is traced"):
        jax.jit(lambda: tuning.tune_shape(kernel.MOSAIC, 8, 32, 128, jnp.int8) and 0)()

    done = tuning.tune_pending(cache_path=cache, repeats=1)
    (key, best), = done.items()
    assert best in kernel.MOSAIC.candidates(8, 32, 128) and set(calls) == set(
        kernel.MOSAIC.candidates(8, 32, 128))
    assert tile_cache.pending() == [] and json.loads(open(cache).read()) == {key: list(best)}

    calls.clear()
    monkeypatch.setattr(tile_cache, "_TUNED", {})  # a new process: only the disk cache remains
    assert tile_cache.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 128, jnp.int8,
                                    cache_path=cache, lowering=lowering) == best
    assert calls == [] and tile_cache.pending() == []
    # a cache entry this lowering cannot run (a stale file) is not used: retuned instead
    open(cache, "w").write(json.dumps({key: [32, 64, 128]}))
    monkeypatch.setattr(tile_cache, "_TUNED", {})
    assert tile_cache.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 128, jnp.int8,
                                    cache_path=cache, lowering=lowering) == \
        kernel.MOSAIC.default(8, 32, 128)
    assert tile_cache.pending() == [key]


def test_tuned_tiles_are_read_back_from_the_default_cache_by_a_new_process(tmp_path,
                                                                           monkeypatch):
    """With no cache named, the tuner writes $NANOCHAT_CACHE/kernel_tiles.json and a later
    trace reads it (before, only $NANOCHAT_TUNE_CACHE was read back: every start retuned)."""
    monkeypatch.delenv(tile_cache.TUNE_CACHE_ENV, raising=False)
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path))
    monkeypatch.setattr(tile_cache, "_TUNED", {})
    monkeypatch.setattr(tile_cache, "_PENDING", {})
    kind = jax.devices()[0].device_kind
    lowering = tuning.local_lowering(kernel.MOSAIC)
    tile_cache.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 256, jnp.int8, lowering=lowering)
    (key, best), = tuning.tune_pending(repeats=1, say=lambda _: None).items()
    assert json.loads((tmp_path / "kernel_tiles.json").read_text()) == {key: list(best)}
    monkeypatch.setattr(tile_cache, "_TUNED", {})  # a new process
    assert tile_cache.lookup_blocks(kernel.MOSAIC, kind, 8, 32, 256, jnp.int8,
                                    lowering=lowering) == best
    assert tile_cache.pending() == []


def test_a_tiling_that_fails_to_compile_is_skipped_with_one_line(monkeypatch, tmp_path):
    """The tuner times what compiles and says one line per refusal; when nothing compiles
    it stops naming the first error."""
    real = kernel.pallas_matmul
    refused = kernel.Blocks(32, 32, 128)

    def compiler(x, codes, blocks, lowering, int8_dots=True):
        if blocks == refused:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit "
                                             "exceeded: requested 286720, available: 232448")
        return real(x, codes, blocks, lowering, int8_dots)

    monkeypatch.setattr(kernel, "pallas_matmul", compiler)
    monkeypatch.setattr(tile_cache, "_TUNED", {})
    cache = str(tmp_path / "tiles.json")
    said = []
    best = tuning.tune_shape(kernel.MOSAIC, 8, 128, 128, jnp.int8, repeats=1, say=said.append,
                             candidates=[refused, kernel.Blocks(32, 128, 128)],
                             cache_path=cache)
    assert best == (32, 128, 128, 1, 4, 2)
    assert len(said) == 1 and "(32, 32, 128, 1, 4, 2)" in said[0] and "skipped" in said[0]
    assert "RESOURCE_EXHAUSTED" in said[0] and "\n" not in said[0]
    with pytest.raises(RuntimeError, match="no tiling of .* compiled.*RESOURCE_EXHAUSTED"):
        tuning.tune_shape(kernel.MOSAIC, 8, 128, 128, jnp.int8, repeats=1,
                          say=lambda _: None, candidates=[refused], cache_path=cache)
    # a cache that cannot be written (here its directory is a file) costs a line, not the run
    (tmp_path / "file").write_text("")
    said.clear()
    assert tuning.tune_shape(kernel.MOSAIC, 8, 128, 128, jnp.int8, repeats=1, say=said.append,
                             candidates=[kernel.Blocks(32, 128, 128)],
                             cache_path=str(tmp_path / "file" / "tiles.json")) == best
    assert len(said) == 1 and "not saved to" in said[0]


DEVICE = jax.devices()[0].platform  # the real device (not NANOCHAT_TEST_AS_BACKEND's)
ON_ACCELERATOR = pytest.mark.skipif(
    DEVICE not in kernel.TILINGS,
    reason="needs a GPU or TPU: the compiled Pallas lowering (this host runs the same "
           "kernel in interpret mode above)")


@ON_ACCELERATOR
@pytest.mark.parametrize("shape", [(1, 4096, 4096), (16, 768, 2048), (4, 2048, 768)])
def test_every_decode_tiling_the_tuner_may_try_runs_exactly_on_the_accelerator(shape):
    """The tilings a decode-sized product can be tuned to (narrow N tiles, K splits) all
    compile and give the exact product on this device."""
    m, k, n = shape
    x, w, _ = _operands(m, k, n)
    t = kernel.TILINGS[DEVICE]
    ref = np.asarray(kernel.ternary_matmul_reference(x, w))
    for blocks in t.candidates(m, *w.codes.shape, jnp.int8, tiling.gpu_of(jax.devices()[0])):
        out = kernel.ternary_matmul(x, w, impl="pallas", blocks=blocks)
        assert_array_equal(np.asarray(out), ref, err_msg=str(blocks))


@ON_ACCELERATOR
@pytest.mark.parametrize("shape", SHAPES + [(1, 4096, 4096), (256, 2048, 5632)])
def test_compiled_kernel_equals_reference_on_the_accelerator(shape):
    x, w, _ = _operands(*shape)
    out = kernel.ternary_matmul(x, w, impl="pallas")  # autotuned tiling
    assert_array_equal(np.asarray(out), np.asarray(kernel.ternary_matmul_reference(x, w)))
    xf, wf, codes = _operands(*shape, dtype=jnp.float32)
    ref = np.asarray(xf) @ codes.astype(np.float32)
    got = np.asarray(kernel.ternary_matmul(xf, wf, impl="pallas"))
    assert np.max(np.abs(got - ref)) <= 1e-2 * np.max(np.abs(ref))  # TF32 dots allowed
