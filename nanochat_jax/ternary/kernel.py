"""Ternary matmul: `x [M, K] @ W [K, N]` with W read as packed 2-bit codes (I2, packing.py).

`ternary_matmul` (packed weights) and `codes_matmul` (int8 codes, packed here) return the
*unscaled* accumulator `x @ codes` (int32 for int8 x, exact; float32 for float x); callers
multiply by the scales. Two implementations with identical semantics sit behind them:

- a Pallas kernel: a `(M/bm, N/bn)` grid; each program loops over K in `bk4`-row steps of
  the packed weights, unpacks a `[bk4, bn]` byte tile into four ternary tiles in registers
  and accumulates four `[bm, bk4] @ [bk4, bn]` dots. Weights cross memory at 2 bits each.
  It lowers through Mosaic on TPU and Triton on GPU; `interpret=True` runs it anywhere.
- the reference: unpack the codes with jnp and call `jnp.dot`.

Which one `impl="auto"` runs is decided by the platform the computation is compiled for,
not by the host (DESIGN principle 4): the platform of the mesh in context (`jax.set_mesh`),
so compiling for a TPU topology from a CPU host takes the Mosaic kernel; with no mesh,
`jax.lax.platform_dependent` lets the lowering pick (Mosaic on TPU, Triton on CUDA/ROCm,
the reference elsewhere), which is also what `jax.export(..., platforms=...)` sees.

Tile sizes obey each lowering's rules (`Tiling`): Mosaic slices x along its 128-wide lane
dimension, so there x's four K-slabs are laid out at multiples of 128 (a per-call pad of
the activations; the packed weights keep their 2 bits each) and `bk4`, `bn` are multiples
of 128 or a whole dimension; Triton wants powers of two. Tilings come from an in-memory /
on-disk tuning cache, filled by `tune_pending` on concrete arrays before a step is
compiled, never while one is traced: a shape the cache lacks gets the tiling's untuned
default and is remembered as pending.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from nanochat_jax.ternary import cpu_kernel
from nanochat_jax.ternary.packing import (
    PackedTernary,
    cpu_tiles,
    i2_codes,
    pack_codes,
    unpack_codes,
)

IMPLS = ("auto", "pallas", "interpret", "reference")
TUNE_CACHE_ENV = "NANOCHAT_TUNE_CACHE"
Blocks = tuple[int, int, int]  # (bm, bk4, bn)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The tile sizes one lowering accepts: candidates per dimension (ascending), whether a
    tile may instead span a whole dimension that none of them divides, the lane width x's
    four K-slabs are aligned to, and the largest tiles the untuned default takes."""

    lowering: str  # "mosaic" | "triton"
    bm: tuple[int, ...]
    bk4: tuple[int, ...]
    bn: tuple[int, ...]
    whole: bool  # a K4 or Np that no candidate divides is one tile (Mosaic: a full dim)
    lane: int  # slab j of x starts at column j * round_up(K4, lane) (Mosaic: 128)
    default_max: Blocks

    def _sizes(self, sizes: tuple[int, ...], dim: int) -> list[int]:
        fits = [b for b in sizes if dim % b == 0]
        return fits or ([dim] if self.whole else [])

    def candidates(self, m: int, k4: int, n_p: int) -> list[Blocks]:
        """Tilings worth timing for an [M, 4 K4] x [K4, Np] product: row tiles up to the
        next power of two of M (decode uses one small tile), K and N tiles that divide."""
        bms = [b for b in self.bm if b <= max(self.bm[0], _next_pow2(m))][-2:]
        bk4s = self._sizes(self.bk4, k4)
        bns = self._sizes(self.bn, n_p)[-3:]
        return [(bm, bk, bn) for bm in bms for bk in bk4s for bn in bns]

    def default(self, m: int, k4: int, n_p: int) -> Blocks:
        """The untuned choice: the largest candidate tiles within `default_max`."""
        self.check_packed(k4, n_p)
        cap_m, cap_k, cap_n = self.default_max
        bm = max(b for b in self.bm if b <= max(self.bm[0], min(cap_m, _next_pow2(m))))

        def pick(sizes, cap):
            return max([b for b in sizes if b <= cap] or [min(sizes)])

        return bm, pick(self._sizes(self.bk4, k4), cap_k), pick(self._sizes(self.bn, n_p),
                                                                 cap_n)

    def check_packed(self, k4: int, n_p: int) -> None:
        if not (self._sizes(self.bk4, k4) and self._sizes(self.bn, n_p)):
            raise ValueError(f"packed weight [{k4}, {n_p}] has no {self.lowering} tiling: K4 "
                             f"and Np must be multiples of {self.bk4[0]} and {self.bn[0]} "
                             f"(packing.K_ALIGN / N_ALIGN)")

    def check(self, blocks: Blocks, k4: int, n_p: int) -> None:
        bm, bk4, bn = blocks
        if (bm not in self.bm or bk4 not in self._sizes(self.bk4, k4)
                or bn not in self._sizes(self.bn, n_p)):
            raise ValueError(f"tiling {blocks} is not a {self.lowering} tiling of the packed "
                             f"weight [{k4}, {n_p}]: candidates are "
                             f"{self.candidates(max(self.bm), k4, n_p)}")


# Mosaic (TPU): x is read in lane slices at j * stride + k * bk4, so bk4 is a multiple of
# 128 or the whole K4 (with every slab starting at a multiple of 128), bn a multiple of 128
# or the whole Np; int8 rows come in sublane tiles of 32. Triton (GPU): powers of two of
# at least 16 rows (tl.dot) and 32 columns (the packing's alignment).
MOSAIC = Tiling("mosaic", bm=(32, 64, 128, 256), bk4=(128, 256, 512), bn=(128, 256, 512),
                whole=True, lane=128, default_max=(128, 256, 256))
TRITON = Tiling("triton", bm=(16, 32, 64, 128), bk4=(32, 64, 128), bn=(32, 64, 128, 256),
                whole=False, lane=1, default_max=(64, 64, 128))
# lowering platform (jax.lax.platform_dependent's names) or device platform -> tiling
TILINGS = {"tpu": MOSAIC, "cuda": TRITON, "rocm": TRITON, "gpu": TRITON}
ACCELERATORS = ("tpu", "cuda", "rocm")  # the lowering platforms with a compiled kernel
# Device kinds whose matrix unit has no int8 mode (Mosaic: "Unsupported matmul RHS type"):
# the kernel multiplies their int8 activations as bf16, exactly (`_pallas_matmul`)
NO_INT8_MXU = ("TPU v2", "TPU v3", "TPU v4")


def _acc_dtype(x_dtype) -> jnp.dtype:
    return jnp.int32 if jnp.issubdtype(x_dtype, jnp.integer) else jnp.float32


def _kernel(x_ref, w_ref, o_ref, *, k4: int, bk4: int, stride: int, operand_dtype):
    """One [bm, bn] output tile.  x_ref: [bm, 4*stride] (slab j of x at columns
    j*stride ..); w_ref: [K4, bn] uint8; o_ref: [bm, bn]. The dots take `operand_dtype`
    operands (x's own, or bf16 for int8 x on chips without an int8 matrix unit)."""
    acc_dtype = _acc_dtype(operand_dtype)

    def step(kb, acc):
        off = pl.multiple_of(kb * bk4, bk4)
        packed = w_ref[pl.ds(off, bk4), :].astype(jnp.int32)  # [bk4, bn]
        for j in range(4):  # the four K-slabs stored in one byte
            w = (((packed >> (2 * j)) & 3) - 1).astype(operand_dtype)  # [bk4, bn] in {-1,0,1}
            xs = x_ref[:, pl.ds(pl.multiple_of(j * stride + off, bk4), bk4)]  # [bm, bk4]
            acc += jnp.dot(xs.astype(operand_dtype), w, preferred_element_type=acc_dtype)
        return acc

    acc = jax.lax.fori_loop(0, k4 // bk4, step, jnp.zeros(o_ref.shape, acc_dtype))
    o_ref[...] = acc.astype(o_ref.dtype)


def _compiler_params(lowering: str):
    if lowering == "mosaic":
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    if lowering == "triton":
        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


def _slabs(x: jax.Array, k4: int, stride: int, rows: int) -> jax.Array:
    """x [M, K] -> [rows, 4 * stride]: zero rows to `rows`, K to 4 slabs of K4 columns,
    each slab padded to `stride` columns."""
    m, k = x.shape
    x = jnp.pad(x, ((0, rows - m), (0, 4 * k4 - k))).reshape(rows, 4, k4)
    return jnp.pad(x, ((0, 0), (0, 0), (0, stride - k4))).reshape(rows, 4 * stride)


@functools.partial(jax.jit, static_argnames=("blocks", "lowering", "int8_dots"))
def _pallas_matmul(x: jax.Array, codes: jax.Array, blocks: Blocks, lowering: str,
                   int8_dots: bool = True) -> jax.Array:
    """x [M, K] @ unpack(codes [K4, Np]) -> [M, Np] (padding columns included).
    `lowering`: "mosaic", "triton", or "interpret" (Mosaic's tiling, interpret mode).
    `int8_dots` False: int8 x is multiplied as bf16 with fp32 accumulation, still exact
    (|x| <= 127 and |w| <= 1 are exact in bf16, and |acc| <= 127 K < 2^24 for K < 132k)."""
    tiling = TRITON if lowering == "triton" else MOSAIC
    bm, bk4, bn = blocks
    k4, n_p = codes.shape
    if lowering != "interpret":
        tiling.check(blocks, k4, n_p)
    elif k4 % bk4 or n_p % bn:
        raise ValueError(f"tiling {blocks} does not divide the packed weight [{k4}, {n_p}]")
    m = x.shape[0]
    mp = -(-m // bm) * bm
    stride = -(-k4 // tiling.lane) * tiling.lane
    xp = _slabs(x, k4, stride, mp)  # [Mp, 4*stride]
    acc = _acc_dtype(x.dtype)
    operand_dtype = x.dtype if int8_dots or x.dtype != jnp.int8 else jnp.bfloat16
    out = pl.pallas_call(
        functools.partial(_kernel, k4=k4, bk4=bk4, stride=stride, operand_dtype=operand_dtype),
        out_shape=jax.ShapeDtypeStruct((mp, n_p), acc),
        grid=(mp // bm, n_p // bn),
        in_specs=[pl.BlockSpec((bm, 4 * stride), lambda i, j: (i, 0)),
                  pl.BlockSpec((k4, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=_compiler_params(lowering),
        interpret=lowering == "interpret",
        # what XLA cannot see inside the custom call: its FLOPs and bytes (cost analysis)
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * 4 * k4 * n_p, transcendentals=0,
            bytes_accessed=(xp.size * xp.dtype.itemsize * (n_p // bn) + codes.size * (mp // bm)
                            + mp * n_p * jnp.dtype(acc).itemsize)),
    )(xp, codes)
    return out[:m]


# ---- tile choice: a cache filled outside traces ------------------------------------------

_TUNED: dict[str, Blocks] = {}
_PENDING: dict[str, tuple[Tiling, int, int, int, str]] = {}  # key -> (tiling, m, k4, n_p, dtype)


def _cache_key(device_kind: str, m: int, k4: int, n_p: int, dtype) -> str:
    return f"{device_kind}|m{min(_next_pow2(m), 1024)}|k4{k4}|n{n_p}|{jnp.dtype(dtype).name}"


def _load_disk_cache(path: str | None) -> dict[str, Blocks]:
    if not path:
        return {}
    try:
        with open(path) as f:
            return {k: tuple(v) for k, v in json.load(f).items()}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def target() -> tuple[str, str] | None:
    """(platform, device kind) of the devices being compiled for: those of the mesh in
    context (`jax.set_mesh`, also inside a trace); None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is None:
        return None
    return device.platform, device.device_kind


def target_platform() -> str:
    """The platform being compiled for: the mesh in context's (`target`), else the default
    backend's."""
    found = target()
    return found[0] if found else jax.default_backend()


def _device_kind(platform: str) -> str:
    """The device kind the tuning cache is keyed by, for a kernel lowered for `platform`."""
    found = target()
    if found is not None:
        return found[1]
    local = jax.devices()[0]
    return local.device_kind if TILINGS.get(local.platform) is TILINGS.get(platform) else platform


def lookup_blocks(tiling: Tiling, device_kind: str, m: int, k4: int, n_p: int, dtype,
                  cache_path: str | None = None) -> Blocks:
    """The tuned tiling for this shape (memory, then the JSON file `cache_path`, default
    $NANOCHAT_TUNE_CACHE), else the tiling's default, the shape noted in `pending()`. Safe
    inside a trace: nothing is timed here."""
    key = _cache_key(device_kind, m, k4, n_p, dtype)
    if key not in _TUNED:
        disk = _load_disk_cache(cache_path or os.environ.get(TUNE_CACHE_ENV))
        if key in disk and _valid(tiling, disk[key], k4, n_p):  # (a stale file: retune)
            _TUNED[key] = disk[key]
    if key in _TUNED:
        return _TUNED[key]
    _PENDING[key] = (tiling, m, k4, n_p, jnp.dtype(dtype).name)
    return tiling.default(m, k4, n_p)


def _valid(tiling: Tiling, blocks: Blocks, k4: int, n_p: int) -> bool:
    try:
        tiling.check(tuple(blocks), k4, n_p)
    except ValueError:
        return False
    return True


def pending() -> list[str]:
    """Cache keys of shapes traced with a default tiling since the last `tune_pending`."""
    return sorted(_PENDING)


def _inside_trace() -> bool:
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def tune_shape(tiling: Tiling, m: int, k4: int, n_p: int, dtype, *,
               candidates: list[Blocks] | None = None, cache_path: str | None = None,
               repeats: int = 3) -> Blocks:
    """Time every candidate tiling of one shape on the local device, with concrete random
    operands, and record the fastest in memory and in `cache_path` (default
    $NANOCHAT_TUNE_CACHE). Refuses to run inside a trace (it would be staged, not run)."""
    if _inside_trace():
        raise RuntimeError("kernel tuning runs on concrete arrays before a step is traced: "
                           "call tune_pending() before jax.jit(...)(...), not inside it")
    device = jax.devices()[0]
    lowering = ("interpret" if TILINGS.get(device.platform) is not tiling
                else tiling.lowering)
    key = _cache_key(device.device_kind, m, k4, n_p, dtype)
    candidates = candidates or tiling.candidates(m, k4, n_p)
    if not candidates:
        raise ValueError(f"no {tiling.lowering} tiling divides the packed shape [{k4}, {n_p}]")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-127, 128, size=(m, 4 * k4)), dtype)
    codes = jnp.asarray(rng.integers(0, 256, size=(k4, n_p)), jnp.uint8)
    timings = {}
    for blocks in candidates:
        run = functools.partial(_pallas_matmul, x, codes, blocks, lowering,
                                device.device_kind not in NO_INT8_MXU)
        run().block_until_ready()  # compile
        started = time.perf_counter()
        for _ in range(repeats):
            run().block_until_ready()
        timings[blocks] = (time.perf_counter() - started) / repeats
    best = min(timings, key=timings.get)
    _TUNED[key] = best
    _PENDING.pop(key, None)
    cache_path = cache_path or os.environ.get(TUNE_CACHE_ENV)
    if cache_path:
        disk = _load_disk_cache(cache_path)
        disk[key] = best
        with open(cache_path, "w") as f:
            json.dump(disk, f, indent=1)
    return best


def adopt(tiles: dict[str, Blocks]) -> None:
    """Use these tilings (cache key -> blocks), tuned elsewhere: another process of the
    same job (train/step.py `tune_kernel_tiles`)."""
    for key, blocks in tiles.items():
        _TUNED[key] = tuple(blocks)
        _PENDING.pop(key, None)


def tune_pending(*, cache_path: str | None = None, repeats: int = 3,
                 say=lambda _: None) -> dict[str, Blocks]:
    """Tune every pending shape of the local device's kind (see `lookup_blocks`): trace the
    step once (e.g. `jax.eval_shape`), call this, then jit the step. -> {key: blocks}."""
    kind = jax.devices()[0].device_kind
    done = {}
    for key, (tiling, m, k4, n_p, dtype) in sorted(_PENDING.items()):
        if key.startswith(kind + "|"):
            started = time.perf_counter()
            done[key] = tune_shape(tiling, m, k4, n_p, dtype, cache_path=cache_path,
                                   repeats=repeats)
            say(f"kernel tiling {key}: {done[key]} ({time.perf_counter() - started:.1f} s)")
    return done


# ---- dispatch ----------------------------------------------------------------------------


def _kernel_for(platform: str, x: jax.Array, codes: jax.Array,
                blocks: Blocks | None) -> jax.Array:
    """The compiled kernel of `platform` ("interpret": Pallas interpret mode)."""
    tiling = MOSAIC if platform == "interpret" else TILINGS[platform]
    k4, n_p = codes.shape
    tiling.check_packed(k4, n_p)
    kind = jax.devices()[0].device_kind if platform == "interpret" else _device_kind(platform)
    if blocks is None:
        blocks = lookup_blocks(tiling, kind, x.shape[0], k4, n_p, x.dtype)
    lowering = "interpret" if platform == "interpret" else tiling.lowering
    int8_dots = platform == "interpret" or kind not in NO_INT8_MXU
    return _pallas_matmul(x, codes, blocks, lowering, int8_dots)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """What `impl` runs on `platform` (default: the target mesh's, else the default
    backend's): 'pallas' on GPU/TPU for 'auto', 'reference' on CPU; others are kept."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ternary matmul impl {impl!r}: choose one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = platform or target_platform()
    return "pallas" if platform in TILINGS else "reference"


def _dispatch(impl: str, x: jax.Array, codes: jax.Array, n: int, reference, kernel_input,
              blocks: Blocks | None, cpu=None) -> jax.Array:
    """Run `reference(x, codes)` -> [M, n] or the kernel on `kernel_input(codes)` (packed),
    cropped to [M, n], as `impl` and the target platform say; `cpu(x, codes)`, when given,
    replaces the reference for 'auto' on the CPU."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ternary matmul impl {impl!r}: choose one of {IMPLS}")
    if impl == "reference":
        return reference(x, codes)

    def compiled(platform: str):
        return lambda a, c: _kernel_for(platform, a, kernel_input(c), blocks)[:, :n]

    if impl == "interpret":
        return compiled("interpret")(x, codes)
    found = target()
    if found is not None:  # compiling for a known mesh: decide now
        platform = found[0]
        if platform in TILINGS:
            return compiled(platform)(x, codes)
        if impl == "auto":
            return (cpu or reference)(x, codes) if platform == "cpu" else reference(x, codes)
        raise ValueError(f"ternary impl 'pallas' compiles for GPU or TPU, but the mesh's "
                         f"devices are {platform}: use 'auto' or 'interpret'")
    branches = {platform: compiled(platform) for platform in ACCELERATORS}
    if impl == "auto" and cpu is not None:
        branches["cpu"] = cpu
    return jax.lax.platform_dependent(x, codes, default=reference if impl == "auto" else None,
                                      **branches)


def codes_matmul(x: jax.Array, codes: jax.Array, *, impl: str = "auto",
                 blocks: Blocks | None = None) -> jax.Array:
    """Unscaled `x [M, K] @ codes [K, N]` for int8 ternary codes in {-1, 0, 1}: the kernel
    packs them first (2 bits each), the reference multiplies them as they are."""
    if x.ndim != 2 or codes.ndim != 2 or x.shape[1] != codes.shape[0]:
        raise ValueError(f"codes_matmul wants x [M, K] and codes [K, N], got {x.shape} and "
                         f"{codes.shape}")
    n = codes.shape[1]

    def reference(a, c):
        return jnp.dot(a, c.astype(a.dtype),
                                         preferred_element_type=_acc_dtype(a.dtype))
    return _dispatch(impl, x, codes, n, reference, pack_codes, blocks)


def ternary_matmul_reference(x: jax.Array, w: PackedTernary) -> jax.Array:
    """x [M, K] @ codes [K, N] with whole-matrix unpacking: the semantics of the kernel."""
    codes = unpack_codes(i2_codes(w), w.shape)  # [K, N] int8
    return jnp.dot(x, codes.astype(x.dtype), preferred_element_type=_acc_dtype(x.dtype))


def ternary_matmul(x: jax.Array, w: PackedTernary, *, impl: str = "auto",
                   blocks: Blocks | None = None) -> jax.Array:
    """Unscaled `x [M, K] @ codes [K, N]`: int32 for int8 x, float32 for float x.

    `impl`: 'auto' | 'pallas' | 'interpret' (the Pallas kernel in interpret mode) |
    'reference'; `blocks` = (bm, bk4, bn) overrides the cached tiling. 'auto' on the CPU
    multiplies int8 x with the native kernel (cpu_kernel.py) when this host has one: I2
    codes are put in its tile order in the call (a pass over the codes each time), CPU
    tiles (`packing.to_layout`, done once by `model.packed.for_cpu`) are used as they are.
    CPU tiles take 'auto' or 'reference' only.
    """
    if x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"ternary_matmul wants x [M, {w.shape[0]}], got {x.shape}")
    k, n = w.shape
    on_cpu = target_platform() == "cpu"  # GPU/TPU hosts never build the CPU kernel
    native = x.dtype == jnp.int8 and on_cpu and cpu_kernel.available()
    if w.layout == "cpu_tiles":
        if impl not in ("auto", "reference"):
            raise ValueError(f"ternary impl {impl!r} reads I2 codes; these are CPU tiles "
                             f"(packing.to_layout(w, 'i2') gives them back)")
        if impl == "auto" and native:
            return cpu_kernel.matmul(x, w.codes)[:, :n]
        return ternary_matmul_reference(x, w)

    def reference(a, c):
        return ternary_matmul_reference(a, PackedTernary(c, w.scale, (k, n)))

    cpu = (lambda a, c: cpu_kernel.matmul(a, cpu_tiles(c))[:, :n]) if native else None
    return _dispatch(impl, x, w.codes, n, reference, lambda c: c, blocks, cpu)
