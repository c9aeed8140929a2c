"""Tile sizes of the Pallas ternary kernel (kernel.py): what each lowering accepts, the tilings
worth timing, the untuned default, and what a Triton tiling asks of a GPU's shared memory.

A tiling is `Blocks(bm, bk4, bn, split_k, num_warps, num_stages)`: a program computes a
`[bm, bn]` output tile, walking its share of the packed rows `bk4` at a time; `split_k`
programs share one output tile along K (each a `K4 / split_k` slice; their partial sums are
added after the kernel, exactly in int32), so a decode-sized product (M <= 16) still gives
every streaming multiprocessor work; `num_warps` and `num_stages` are Triton's compiler
parameters (ignored by Mosaic). A plain `(bm, bk4, bn)` triple means the defaults for the rest.

Mosaic (TPU) reads x in 128-lane slices, so `bk4` and `bn` are multiples of 128 or a whole
dimension, rows come in int8 sublane tiles of 32, and K is not split. Triton (GPU) wants
powers of two (rows >= 16 for `tl.dot`, columns >= 32: the packing's alignment), and a
tiling must fit the GPU's shared memory per block (`triton_shared_memory`, checked against
`gpu_of(device)`): a candidate over it is never offered to the tuner.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

# A decode-sized product: at most this many rows, one row tile; its tilings split N finely
# and K across programs (a [1, 4096] x [4096, 4096] product in 128-column tiles is 32
# programs for an H100's 132 SMs).
DECODE_ROWS = 16
SPLITS = (1, 2, 3, 4, 6, 8)  # split_k values a decode tiling may take
DECODE_PROGRAMS = 264  # the untuned decode default aims at this many programs (2 per H100 SM)


class Blocks(NamedTuple):
    """One tiling of the kernel (module docstring)."""

    bm: int
    bk4: int
    bn: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def as_blocks(value) -> Blocks:
    """A `Blocks` from a tuple or list of 3 to 6 positive ints (a cache entry, `blocks=`)."""
    values = tuple(value)
    if not 3 <= len(values) <= 6 or not all(isinstance(v, (int, np.integer)) and v > 0
                                            for v in values):
        raise ValueError(f"a tiling is (bm, bk4, bn[, split_k, num_warps, num_stages]) of "
                         f"positive ints, got {value!r}")
    return Blocks(*(int(v) for v in values))


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The tile sizes one lowering accepts: candidates per dimension (ascending), whether a
    tile may instead span a whole dimension that none of them divides, the lane width x's
    four K-slabs are aligned to, the largest tiles the untuned default takes, and whether
    K may be split across programs."""

    lowering: str  # "mosaic" | "triton"
    bm: tuple[int, ...]
    bk4: tuple[int, ...]
    bn: tuple[int, ...]
    whole: bool  # a K4 or Np that no candidate divides is one tile (Mosaic: a full dim)
    lane: int  # slab j of x starts at column j * round_up(K4, lane) (Mosaic: 128)
    default_max: tuple[int, int, int]
    split_k: bool = False

    def _sizes(self, sizes: tuple[int, ...], dim: int) -> list[int]:
        fits = [b for b in sizes if dim % b == 0]
        return fits or ([dim] if self.whole else [])

    def _rows(self, m: int) -> list[int]:
        """Row tiles worth trying: the two largest up to the next power of two of M."""
        return [b for b in self.bm if b <= max(self.bm[0], next_pow2(m))][-2:]

    def candidates(self, m: int, k4: int, n_p: int, x_dtype="int8",
                   gpu: Gpu | None = None) -> list[Blocks]:
        """Tilings worth timing for an [M, 4 K4] x [K4, Np] product with `x_dtype`
        activations: row tiles up to the next power of two of M; K and N tiles that divide
        (decode: the three smallest N tiles, every K split that leaves whole K steps and
        the two largest K steps; otherwise the three largest N tiles, K whole). Triton
        tilings that would not fit the shared memory of `gpu` (None: not checked) are left
        out."""
        decode = self.split_k and m <= DECODE_ROWS
        bns = self._sizes(self.bn, n_p)
        bns = bns[:3] if decode else bns[-3:]
        out = []
        for split in (SPLITS if decode else (1,)):
            if k4 % split:
                continue
            bk4s = self._sizes(self.bk4, k4 // split)
            for bk4 in (bk4s[-2:] if decode else bk4s):
                out += [Blocks(bm, bk4, bn, split) for bm in self._rows(m) for bn in bns]
        return [b for b in out if self.fits(b, x_dtype, gpu)]

    def fits(self, blocks: Blocks, x_dtype, gpu: Gpu | None) -> bool:
        """Whether a tiling fits the shared memory per block of `gpu` (Mosaic, or no GPU
        named: yes)."""
        return (self.lowering != "triton" or gpu is None
                or triton_shared_memory(blocks, x_dtype, gpu.capability) <= gpu.shared_memory)

    def default(self, m: int, k4: int, n_p: int, x_dtype="int8") -> Blocks:
        """The untuned choice: the largest candidate tiles within `default_max`; a decode
        product on a lowering that splits K gets narrow column tiles and enough K splits for
        about `DECODE_PROGRAMS` programs. A Triton default fits the smallest shared memory
        of `SHARED_MEMORY_PER_BLOCK` (it is compiled for a GPU not known while tracing):
        column, then K, then row tiles halve until it does."""
        self.check_packed(k4, n_p)
        cap_m, cap_k, cap_n = self.default_max
        bm = max(b for b in self.bm if b <= max(self.bm[0], min(cap_m, next_pow2(m))))

        def pick(sizes, cap):
            return max([b for b in sizes if b <= cap] or [min(sizes)])

        if not (self.split_k and m <= DECODE_ROWS):
            blocks = Blocks(bm, pick(self._sizes(self.bk4, k4), cap_k),
                            pick(self._sizes(self.bn, n_p), cap_n))
        else:
            bn = pick(self._sizes(self.bn, n_p), 64)
            splits = [s for s in SPLITS if k4 % s == 0 and self._sizes(self.bk4, k4 // s)]
            split = next((s for s in splits if (n_p // bn) * s >= DECODE_PROGRAMS), splits[-1])
            blocks = Blocks(bm, pick(self._sizes(self.bk4, k4 // split), cap_k), bn, split)
        smallest = SMALLEST_GPU
        for field, sizes in (("bn", self._sizes(self.bn, n_p)),
                             ("bk4", self._sizes(self.bk4, k4 // blocks.split_k)),
                             ("bm", self.bm)):
            while not self.fits(blocks, x_dtype, smallest) and getattr(blocks, field) > sizes[0]:
                blocks = blocks._replace(**{field: max(b for b in sizes
                                                        if b < getattr(blocks, field))})
        return blocks

    def check_packed(self, k4: int, n_p: int) -> None:
        if not (self._sizes(self.bk4, k4) and self._sizes(self.bn, n_p)):
            raise ValueError(f"packed weight [{k4}, {n_p}] has no {self.lowering} tiling: K4 "
                             f"and Np must be multiples of {self.bk4[0]} and {self.bn[0]} "
                             f"(packing.K_ALIGN / N_ALIGN)")

    def accepts(self, blocks: Blocks, k4: int, n_p: int) -> bool:
        """Whether this lowering can run `blocks` on a packed [K4, Np] weight."""
        bm, bk4, bn, split, warps, stages = blocks
        if split != 1 and not self.split_k:
            return False
        return (bm in self.bm and k4 % split == 0 and bk4 in self._sizes(self.bk4, k4 // split)
                and bn in self._sizes(self.bn, n_p) and warps in (1, 2, 4, 8, 16)
                and stages >= 1)

    def check(self, blocks: Blocks, k4: int, n_p: int) -> None:
        if not self.accepts(blocks, k4, n_p):
            raise ValueError(f"tiling {tuple(blocks)} is not a {self.lowering} tiling of the "
                             f"packed weight [{k4}, {n_p}]: candidates are "
                             f"{[tuple(b) for b in self.candidates(max(self.bm), k4, n_p)]}")


MOSAIC = Tiling("mosaic", bm=(32, 64, 128, 256), bk4=(128, 256, 512), bn=(128, 256, 512),
                whole=True, lane=128, default_max=(128, 256, 256))
TRITON = Tiling("triton", bm=(16, 32, 64, 128), bk4=(32, 64, 128), bn=(32, 64, 128, 256),
                whole=False, lane=1, default_max=(64, 64, 128), split_k=True)


class Gpu(NamedTuple):
    """What a tiling must fit on one CUDA GPU: its compute capability and its largest shared
    memory per block (with opt-in)."""

    capability: tuple[int, int]
    shared_memory: int


def triton_shared_memory(blocks: Blocks, x_dtype, capability: tuple[int, int] = (9, 0)
                         ) -> int:
    """Bytes of shared memory per block Triton asks for this tiling (an upper bound): the
    software pipeline's buffers of x's four `[bm, bk4]` slabs and of the `[bk4, bn]` packed
    tile (`num_stages` of them on sm_90 and later, one fewer before), one more packed
    tile, and 512 bytes per warp; or the 32-bit `[bm, bn]` accumulator re-laid out for the
    store, whichever is larger.

    Derived from the compiler's own figures: every tiling of the candidate sizes was
    compiled for H100 (sm_90) and A100 (sm_80) target configs whose shared memory limit was
    set to 1 KiB, so each compile failed naming the bytes it needed (int8, bf16 and f32
    activations, 2-4 stages, 4 and 8 warps: 1,692 compiles); this bound is at or above
    every one of them (BUILD.md#the-ternary-kernel; tests/test_compile_gpu.py checks it
    again in CI for the tilings the tuner can offer at a training and a decode shape)."""
    itemsize = jnp.dtype(x_dtype).itemsize
    bm, bk4, bn = blocks[:3]
    buffers = blocks.num_stages if capability >= (9, 0) else max(blocks.num_stages - 1, 1)
    staged = buffers * (4 * bm * bk4 * itemsize + bk4 * bn)
    return max(staged + bk4 * bn + 512 * blocks.num_warps, 4 * bm * bn)


# Largest shared memory per block with opt-in, by CUDA compute capability (CUDA C Programming
# Guide, "Technical Specifications per Compute Capability": 163 KiB on 8.0 and 8.7, 99 KiB
# on 8.6, 8.9 and 12.x, 227 KiB on 9.0 and 10.x); a capability not listed gets the smallest.
SHARED_MEMORY_PER_BLOCK = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376,
                           (9, 0): 232448, (10, 0): 232448, (10, 3): 232448,
                           (12, 0): 101376}


# What a tiling chosen without knowing the GPU must fit (Tiling.default): the least shared
# memory per block of the GPUs above, with every pipeline buffer counted (sm_120).
SMALLEST_GPU = Gpu((12, 0), min(SHARED_MEMORY_PER_BLOCK.values()))


def gpu_of(device) -> Gpu | None:
    """The `Gpu` of a CUDA device (a real or a compile-only one, from its compute
    capability); None for other devices."""
    capability = str(getattr(device, "compute_capability", ""))
    major, _, minor = capability.partition(".")
    if not (major.isdigit() and (minor.isdigit() or not minor)):  # not CUDA (ROCm: gfx90a)
        return None
    key = (int(major), int(minor or 0))
    return Gpu(key, SHARED_MEMORY_PER_BLOCK.get(key, SMALLEST_GPU.shared_memory))


def slab_alignment(k4: int, blocks: Blocks, stride: int) -> int:
    """The largest power of two that divides every column offset the kernel reads x at:
    `j * stride + s * (K4 / split_k) + kb * bk4` over slabs j, splits s and K steps kb
    (only the terms that vary count)."""
    share = k4 // blocks.split_k
    terms = [stride]
    if blocks.split_k > 1:
        terms.append(share)
    if share // blocks.bk4 > 1:
        terms.append(blocks.bk4)
    common = math.gcd(*terms)
    return common & -common
