"""Ternary matmul: `x [M, K] @ W [K, N]` with W read as packed 2-bit codes (I2, packing.py).

`ternary_matmul` (packed weights) and `codes_matmul` (int8 codes, packed here) return the
*unscaled* accumulator `x @ codes` (int32 for int8 x, exact; float32 for float x); callers
multiply by the scales. Two implementations with identical semantics sit behind them:

- a Pallas kernel: a `(M/bm, N/bn[, split_k])` grid; each program loops over its share of
  K in `bk4`-row steps of the packed weights, unpacks a `[bk4, bn]` byte tile into four
  ternary tiles in registers and accumulates four `[bm, bk4] @ [bk4, bn]` dots; with K
  split, the programs' partial sums are added afterwards (exact in int32). Weights cross
  memory at 2 bits each. It lowers through Mosaic on TPU and Triton on GPU;
  `interpret=True` runs it anywhere.
- the reference: unpack the codes with jnp and call `jnp.dot`.

Which one `impl="auto"` runs is decided by the platform the computation is compiled for,
not by the host: the platform of the mesh in context (`jax.set_mesh`), so compiling for a
TPU topology or a GPU target from a CPU host takes the Mosaic or Triton kernel; with no
mesh, `jax.lax.platform_dependent` lets the lowering pick (Mosaic on TPU, Triton on
CUDA/ROCm, the reference elsewhere), which is also what `jax.export(..., platforms=...)`
sees.

Tile sizes obey each lowering's rules (tiling.py). Tilings come from an in-memory / on-disk
cache (tile_cache.py), filled by the tuner (tuning.py `tune_pending`) on concrete arrays
before a step is compiled, never while one is traced: a shape the cache lacks gets the
tiling's untuned default and is remembered as pending.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from nanochat_jax.ternary import cpu_kernel, tile_cache
from nanochat_jax.ternary.packing import (
    PackedTernary,
    cpu_tiles,
    i2_codes,
    pack_codes,
    unpack_codes,
)
from nanochat_jax.ternary.tiling import (
    MOSAIC,
    TRITON,
    Blocks,
    as_blocks,
    slab_alignment,
)

IMPLS = ("auto", "pallas", "interpret", "reference")
# lowering platform (jax.lax.platform_dependent's names) or device platform -> tiling
TILINGS = {"tpu": MOSAIC, "cuda": TRITON, "rocm": TRITON, "gpu": TRITON}
ACCELERATORS = ("tpu", "cuda", "rocm")  # the lowering platforms with a compiled kernel
# Device kinds whose matrix unit has no int8 mode (Mosaic: "Unsupported matmul RHS type"):
# the kernel multiplies their int8 activations as bf16, exactly (`pallas_matmul`)
NO_INT8_MXU = ("TPU v2", "TPU v3", "TPU v4")


def _acc_dtype(x_dtype) -> jnp.dtype:
    return jnp.int32 if jnp.issubdtype(x_dtype, jnp.integer) else jnp.float32


def _kernel(x_ref, w_ref, o_ref, *, steps: int, bk4: int, stride: int, share: int,
            split: int, align: int, operand_dtype):
    """One [bm, bn] output tile (of one K share when split > 1).  x_ref: [bm, 4*stride]
    (slab j of x at columns j*stride ..); w_ref: [share, bn] uint8, this program's packed
    rows; o_ref: [bm, bn]. Slab j of this share starts at column j*stride + s*share, every
    offset a multiple of `align` (tiling.slab_alignment). The dots take `operand_dtype`
    operands (x's own, or bf16 for int8 x on chips without an int8 matrix unit)."""
    acc_dtype = _acc_dtype(operand_dtype)
    start = pl.program_id(2) * share if split > 1 else 0

    def step(kb, acc):
        off = pl.multiple_of(kb * bk4, bk4)
        packed = w_ref[pl.ds(off, bk4), :].astype(jnp.int32)  # [bk4, bn]
        for j in range(4):  # the four K-slabs stored in one byte
            w = (((packed >> (2 * j)) & 3) - 1).astype(operand_dtype)  # [bk4, bn] in {-1,0,1}
            column = pl.multiple_of(j * stride + start + off, align)
            xs = x_ref[:, pl.ds(column, bk4)]  # [bm, bk4]
            acc += jnp.dot(xs.astype(operand_dtype), w, preferred_element_type=acc_dtype)
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(o_ref.shape, acc_dtype))
    o_ref[...] = acc.astype(o_ref.dtype)


def _compiler_params(lowering: str, blocks: Blocks):
    if lowering == "mosaic":  # (Mosaic tilings never split K)
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    if lowering == "triton":
        return pltriton.CompilerParams(num_warps=blocks.num_warps,
                                       num_stages=blocks.num_stages)
    return None


def _slabs(x: jax.Array, k4: int, stride: int, rows: int) -> jax.Array:
    """x [M, K] -> [rows, 4 * stride]: zero rows to `rows`, K to 4 slabs of K4 columns,
    each slab padded to `stride` columns."""
    m, k = x.shape
    x = jnp.pad(x, ((0, rows - m), (0, 4 * k4 - k))).reshape(rows, 4, k4)
    return jnp.pad(x, ((0, 0), (0, 0), (0, stride - k4))).reshape(rows, 4 * stride)


@functools.partial(jax.jit, static_argnames=("blocks", "lowering", "int8_dots"))
def pallas_matmul(x: jax.Array, codes: jax.Array, blocks: Blocks, lowering: str,
                  int8_dots: bool = True) -> jax.Array:
    """x [M, K] @ unpack(codes [K4, Np]) -> [M, Np] (padding columns included).
    `lowering`: "mosaic", "triton", or "interpret" (Mosaic's slab layout, interpret mode,
    any tiling that divides). `int8_dots` False: int8 x is multiplied as bf16 with fp32
    accumulation, still exact (|x| <= 127 and |w| <= 1 are exact in bf16, and
    |acc| <= 127 K < 2^24 for K < 132k)."""
    blocks = as_blocks(blocks)
    tiling = TRITON if lowering == "triton" else MOSAIC
    bm, bk4, bn, split = blocks[:4]
    k4, n_p = codes.shape
    share = k4 // split
    if lowering != "interpret":
        tiling.check(blocks, k4, n_p)
    elif k4 % split or share % bk4 or n_p % bn:
        raise ValueError(f"tiling {tuple(blocks)} does not divide the packed weight "
                         f"[{k4}, {n_p}]")
    m = x.shape[0]
    mp = -(-m // bm) * bm
    stride = -(-k4 // tiling.lane) * tiling.lane
    xp = _slabs(x, k4, stride, mp)  # [Mp, 4*stride]
    acc = _acc_dtype(x.dtype)
    operand_dtype = x.dtype if int8_dots or x.dtype != jnp.int8 else jnp.bfloat16
    body = functools.partial(_kernel, steps=share // bk4, bk4=bk4, stride=stride, share=share,
                             split=split, align=slab_alignment(k4, blocks, stride),
                             operand_dtype=operand_dtype)
    if split == 1:
        grid = (mp // bm, n_p // bn)
        in_specs = [pl.BlockSpec((bm, 4 * stride), lambda i, j: (i, 0)),
                    pl.BlockSpec((k4, bn), lambda i, j: (0, j))]
        out_specs = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
        out_shape = jax.ShapeDtypeStruct((mp, n_p), acc)
    else:  # program (i, j, s) adds rows s*share .. of K into partial sum s
        grid = (mp // bm, n_p // bn, split)
        in_specs = [pl.BlockSpec((bm, 4 * stride), lambda i, j, s: (i, 0)),
                    pl.BlockSpec((share, bn), lambda i, j, s: (s, j))]
        out_specs = pl.BlockSpec((pl.squeezed, bm, bn), lambda i, j, s: (s, i, j))
        out_shape = jax.ShapeDtypeStruct((split, mp, n_p), acc)
    out = pl.pallas_call(
        body, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=_compiler_params(lowering, blocks),
        interpret=lowering == "interpret",
        # what XLA cannot see inside the custom call: its FLOPs and bytes (cost analysis)
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * 4 * k4 * n_p, transcendentals=0,
            bytes_accessed=(xp.size * xp.dtype.itemsize * (n_p // bn) + codes.size * (mp // bm)
                            + split * mp * n_p * jnp.dtype(acc).itemsize)),
    )(xp, codes)
    if split > 1:
        out = jnp.sum(out, axis=0, dtype=acc)  # [Mp, Np]
    return out[:m]


# ---- the platform compiled for -----------------------------------------------------------


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
    """The device kind the tile cache is keyed by, for a kernel lowered for `platform`."""
    found = target()
    if found is not None:
        return found[1]
    local = jax.devices()[0]
    return local.device_kind if TILINGS.get(local.platform) is TILINGS.get(platform) else platform


# ---- dispatch ----------------------------------------------------------------------------


def _kernel_for(platform: str, x: jax.Array, codes: jax.Array,
                blocks: Blocks | None) -> jax.Array:
    """The compiled kernel of `platform` ("interpret": Pallas interpret mode). `blocks`
    that this platform's tiling does not accept (a GPU tiling, say, in the TPU branch of a
    product lowered for either) give way to its own tuned or default tiling."""
    tiling = MOSAIC if platform == "interpret" else TILINGS[platform]
    k4, n_p = codes.shape
    tiling.check_packed(k4, n_p)
    kind = jax.devices()[0].device_kind if platform == "interpret" else _device_kind(platform)
    if blocks is not None and platform != "interpret" and not tiling.accepts(blocks, k4, n_p):
        blocks = None
    lowering = "interpret" if platform == "interpret" else tiling.lowering
    if blocks is None:
        blocks = tile_cache.lookup_blocks(tiling, kind, x.shape[0], k4, n_p, x.dtype,
                                          lowering=lowering)
    int8_dots = platform == "interpret" or kind not in NO_INT8_MXU
    return pallas_matmul(x, codes, blocks, lowering, int8_dots)


def _check_blocks(blocks, codes_shape: tuple[int, int], platforms: tuple[str, ...]
                  ) -> Blocks:
    """`blocks` as a `Blocks`, refused unless the tiling of one of `platforms` accepts it
    for packed codes of `codes_shape` (no platforms: any tiling that divides, interpret)."""
    blocks = as_blocks(blocks)
    tilings = sorted({TILINGS[p] for p in platforms if p in TILINGS}, key=lambda t: t.lowering)
    if tilings and not any(t.accepts(blocks, *codes_shape) for t in tilings):
        names = " or ".join(t.lowering for t in tilings)
        offered = "; ".join(f"{t.lowering} {[tuple(b[:3]) for b in t.candidates(64, *codes_shape)]}"
                            for t in tilings)
        raise ValueError(f"tiling {tuple(blocks)} is not a {names} tiling of the packed "
                         f"weight {list(codes_shape)}: candidates are {offered}")
    return blocks


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
    replaces the reference for 'auto' on the CPU. `blocks` must be a tiling of the
    platform compiled for; with no mesh, of at least one accelerator (the others take
    their own)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown ternary matmul impl {impl!r}: choose one of {IMPLS}")
    if impl == "reference":
        return reference(x, codes)

    def compiled(platform: str):
        return lambda a, c: _kernel_for(platform, a, kernel_input(c), blocks)[:, :n]

    def checked(platforms: tuple[str, ...]) -> Blocks | None:
        if blocks is None:
            return None
        return _check_blocks(blocks, jax.eval_shape(kernel_input, codes).shape, platforms)

    if impl == "interpret":
        blocks = checked(())
        return compiled("interpret")(x, codes)
    found = target()
    if found is not None:  # compiling for a known mesh: decide now
        platform = found[0]
        if platform in TILINGS:
            blocks = checked((platform,))
            return compiled(platform)(x, codes)
        if impl == "auto":
            return (cpu or reference)(x, codes) if platform == "cpu" else reference(x, codes)
        raise ValueError(f"ternary impl 'pallas' compiles for GPU or TPU, but the mesh's "
                         f"devices are {platform}: use 'auto' or 'interpret'")
    blocks = checked(ACCELERATORS)
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
        return jnp.dot(a, c.astype(a.dtype), preferred_element_type=_acc_dtype(a.dtype))

    return _dispatch(impl, x, codes, n, reference, pack_codes, blocks)


def ternary_matmul_reference(x: jax.Array, w: PackedTernary) -> jax.Array:
    """x [M, K] @ codes [K, N] with whole-matrix unpacking: the semantics of the kernel."""
    codes = unpack_codes(i2_codes(w), w.shape)  # [K, N] int8
    return jnp.dot(x, codes.astype(x.dtype), preferred_element_type=_acc_dtype(x.dtype))


def ternary_matmul(x: jax.Array, w: PackedTernary, *, impl: str = "auto",
                   blocks: Blocks | None = None) -> jax.Array:
    """Unscaled `x [M, K] @ codes [K, N]`: int32 for int8 x, float32 for float x.

    `impl`: 'auto' | 'pallas' | 'interpret' (the Pallas kernel in interpret mode) |
    'reference'; `blocks` = (bm, bk4, bn[, split_k, num_warps, num_stages]) overrides the
    cached tiling (tiling.py). 'auto' on the CPU
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
