"""Ternary matmul: `x [M, K] @ W [K, N]` with W read as packed 2-bit codes (I2, packing.py).

`ternary_matmul` returns the *unscaled* accumulator `x @ codes` (int32 for int8 x, exact;
float32 for float x); callers multiply by the scales. Two implementations with identical
semantics sit behind it:

- a Pallas kernel: a `(M/bm, N/bn)` grid; each program loops over K in `bk4`-row steps of
  the packed weights, unpacks a `[bk4, bn]` byte tile into four ternary tiles in registers
  and accumulates four `[bm, bk4] @ [bk4, bn]` dots. Weights cross memory at 2 bits each.
  It lowers through Triton on GPU and Mosaic on TPU; `interpret=True` runs it anywhere.
- `ternary_matmul_reference`: unpack the whole matrix with jnp and call `jnp.dot`.

`impl="auto"` picks Pallas on GPU/TPU and the reference on CPU (DESIGN principle 4);
`impl="interpret"` runs the Pallas kernel in interpret mode on any backend (tests). Block
sizes come from `choose_blocks`: timed once per shape on the current device and cached in
memory and, if `NANOCHAT_TUNE_CACHE` names a JSON file, on disk.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from nanochat_jax.ternary.packing import PackedTernary, unpack_codes

IMPLS = ("auto", "pallas", "interpret", "reference")
TUNE_CACHE_ENV = "NANOCHAT_TUNE_CACHE"
_TUNED: dict[str, tuple[int, int, int]] = {}


def _acc_dtype(x_dtype) -> jnp.dtype:
    return jnp.int32 if jnp.issubdtype(x_dtype, jnp.integer) else jnp.float32


def ternary_matmul_reference(x: jax.Array, w: PackedTernary) -> jax.Array:
    """x [M, K] @ codes [K, N] with whole-matrix unpacking: the semantics of the kernel."""
    codes = unpack_codes(w.codes, w.shape)  # [K, N] int8
    return jnp.dot(x, codes.astype(x.dtype), preferred_element_type=_acc_dtype(x.dtype))


def _kernel(x_ref, w_ref, o_ref, *, k4: int, bk4: int):
    """One [bm, bn] output tile.  x_ref: [bm, 4*K4]; w_ref: [K4, bn] uint8; o_ref: [bm, bn]."""
    acc_dtype = o_ref.dtype

    def step(kb, acc):
        off = pl.multiple_of(kb * bk4, bk4)
        packed = w_ref[pl.ds(off, bk4), :].astype(jnp.int32)  # [bk4, bn]
        for j in range(4):  # the four K-slabs stored in one byte
            w = (((packed >> (2 * j)) & 3) - 1).astype(x_ref.dtype)  # [bk4, bn] in {-1,0,1}
            xs = x_ref[:, pl.ds(j * k4 + off, bk4)]  # [bm, bk4]
            acc += jnp.dot(xs, w, preferred_element_type=acc_dtype)
        return acc

    acc = jax.lax.fori_loop(0, k4 // bk4, step, jnp.zeros(o_ref.shape, acc_dtype))
    o_ref[...] = acc


def _compiler_params(backend: str):
    if backend == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    return None


def _pad_x(x: jax.Array, w: PackedTernary, bm: int) -> jax.Array:
    """x [M, K] -> [Mp, 4*K4]: rows to a multiple of bm, columns to the packed K."""
    m, k = x.shape
    mp = -(-m // bm) * bm
    return jnp.pad(x, ((0, mp - m), (0, 4 * w.codes.shape[0] - k)))


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _pallas_matmul(x: jax.Array, w: PackedTernary, blocks: tuple[int, int, int],
                   interpret: bool) -> jax.Array:
    bm, bk4, bn = blocks
    k4, n_p = w.codes.shape
    xp = _pad_x(x, w, bm)
    mp = xp.shape[0]
    out = pl.pallas_call(
        functools.partial(_kernel, k4=k4, bk4=bk4),
        out_shape=jax.ShapeDtypeStruct((mp, n_p), _acc_dtype(x.dtype)),
        grid=(mp // bm, n_p // bn),
        in_specs=[pl.BlockSpec((bm, 4 * k4), lambda i, j: (i, 0)),
                  pl.BlockSpec((k4, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=None if interpret else _compiler_params(jax.default_backend()),
        interpret=interpret,
    )(xp, w.codes)
    return out[: x.shape[0], : w.shape[1]]


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def candidate_blocks(m: int, k4: int, n_p: int) -> list[tuple[int, int, int]]:
    """Tilings (bm, bk4, bn) worth timing: powers of two (Triton needs them) that divide the
    packed shape; bm follows M so decode (M <= 16) uses one 16-row tile."""
    bms = [b for b in (16, 32, 64, 128) if b <= max(16, _next_pow2(m))][-2:]
    bk4s = [b for b in (32, 64, 128) if k4 % b == 0]
    bns = [b for b in (32, 64, 128, 256) if n_p % b == 0][-3:]
    return [(bm, bk, bn) for bm in bms for bk in bk4s for bn in bns]


def _default_blocks(m: int, k4: int, n_p: int) -> tuple[int, int, int]:
    """The untimed choice (interpret mode): largest candidate tiles."""
    return max(candidate_blocks(m, k4, n_p), key=lambda b: (b[1] * b[2], b[0]))


def _cache_key(m: int, k4: int, n_p: int, dtype) -> str:
    device = jax.devices()[0].device_kind
    return f"{device}|m{min(_next_pow2(m), 1024)}|k4{k4}|n{n_p}|{jnp.dtype(dtype).name}"


def _load_disk_cache(path: str) -> dict:
    try:
        with open(path) as f:
            return {k: tuple(v) for k, v in json.load(f).items()}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def choose_blocks(m: int, k4: int, n_p: int, dtype, *, interpret: bool = False,
                  candidates: list[tuple[int, int, int]] | None = None,
                  cache_path: str | None = None, repeats: int = 3) -> tuple[int, int, int]:
    """The fastest tiling for this shape on this device, timed once and cached.

    Looks in memory, then in the JSON file `cache_path` (default: $NANOCHAT_TUNE_CACHE);
    otherwise times every candidate on random data and records the winner in both.
    """
    key = _cache_key(m, k4, n_p, dtype)
    cache_path = cache_path or os.environ.get(TUNE_CACHE_ENV)
    if key in _TUNED:
        return _TUNED[key]
    if cache_path and key in (disk := _load_disk_cache(cache_path)):
        _TUNED[key] = disk[key]
        return disk[key]
    candidates = candidates or candidate_blocks(m, k4, n_p)
    if not candidates:
        raise ValueError(f"no tiling divides the packed shape [{k4}, {n_p}]")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-127, 128, size=(m, 4 * k4)), dtype)
    w = PackedTernary(jnp.asarray(rng.integers(0, 256, size=(k4, n_p)), jnp.uint8),
                      jnp.float32(1.0), (4 * k4, n_p))
    timings = {}
    for blocks in candidates:
        run = lambda b=blocks: _pallas_matmul(x, w, b, interpret).block_until_ready()
        run()  # compile
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        timings[blocks] = (time.perf_counter() - t0) / repeats
    best = min(timings, key=timings.get)
    _TUNED[key] = best
    if cache_path:
        disk = _load_disk_cache(cache_path)
        disk[key] = best
        with open(cache_path, "w") as f:
            json.dump(disk, f, indent=1)
    return best


def resolve_impl(impl: str) -> str:
    """'auto' -> 'pallas' on GPU/TPU, 'reference' on CPU; other names are checked and kept."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ternary matmul impl {impl!r}: choose one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "reference"
    return impl


def ternary_matmul(x: jax.Array, w: PackedTernary, *, impl: str = "auto",
                   blocks: tuple[int, int, int] | None = None) -> jax.Array:
    """Unscaled `x [M, K] @ codes [K, N]`: int32 for int8 x, float32 for float x.

    `impl`: 'auto' | 'pallas' | 'interpret' (the Pallas kernel in interpret mode) |
    'reference'; `blocks` = (bm, bk4, bn) overrides the tuned tiling.
    """
    if x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"ternary_matmul wants x [M, {w.shape[0]}], got {x.shape}")
    impl = resolve_impl(impl)
    if impl == "reference":
        return ternary_matmul_reference(x, w)
    interpret = impl == "interpret"
    k4, n_p = w.codes.shape
    if blocks is None:
        blocks = (_default_blocks(x.shape[0], k4, n_p) if interpret
                  else choose_blocks(x.shape[0], k4, n_p, x.dtype))
    return _pallas_matmul(x, w, blocks, interpret)
