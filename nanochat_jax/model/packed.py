"""Inference from packed weights: convert a trained model's ternary kernels once to I2.

`pack_params(params)` moves every BitLinear kernel (model/params.py `is_hidden`) out of
`params` into a `packed` collection of `PackedTernary` (2 bits per weight + one scale), so
`model.apply(pack_params(params), tokens)` runs with no latent weights in memory.
`for_cpu(variables)` puts the packed codes in the CPU kernel's tile order once (the Engine
does it when it decodes on a CPU with the kernel), instead of in every product.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from nanochat_jax.model.params import is_hidden, path_names
from nanochat_jax.ternary import cpu_kernel, kernel
from nanochat_jax.ternary.packing import PackedTernary, pack, to_layout


def pack_params(params: dict) -> dict[str, Any]:
    """{'params': ...} tree (or its inner dict) -> {'params': rest, 'packed': I2 kernels}."""
    params = params.get("params", params)
    packed: dict = {}
    rest: dict = {}

    def place(tree: dict, path: tuple, value) -> None:
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = value

    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = path_names(path)
        if is_hidden(path, leaf):
            place(packed, keys, jax.jit(pack)(leaf))
        else:
            place(rest, keys, leaf)
    return {"params": rest, "packed": packed}


def for_cpu(variables: dict) -> dict[str, Any]:
    """Packed variables with every kernel's codes as CPU tiles when they will be computed on
    a CPU that has the native kernel (the mesh in context, else the default backend, is a
    CPU, and `cpu_kernel.available()`); unchanged otherwise. Abstract variables
    (`jax.ShapeDtypeStruct`, for ahead-of-time compiles) get abstract tiles."""
    if kernel.target_platform() != "cpu" or not cpu_kernel.available():
        return variables
    to_tiles = functools.partial(to_layout, layout="cpu_tiles")

    def tile(p: PackedTernary) -> PackedTernary:
        if isinstance(p.codes, jax.ShapeDtypeStruct):
            return jax.eval_shape(to_tiles, p)
        return jax.jit(to_tiles)(p)

    tiled = jax.tree.map(tile, variables["packed"], is_leaf=lambda x: isinstance(x, PackedTernary))
    return {**variables, "packed": tiled}


def ternary_weight_bytes(params: dict, dtype_bytes: int = 2) -> int:
    """Bytes the BitLinear kernels of an unpacked model take at `dtype_bytes` (bf16: 2)."""
    params = params.get("params", params)
    return sum(leaf.size * dtype_bytes
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if is_hidden(path, leaf))


def packed_bytes(variables: dict) -> int:
    """Bytes of the packed ternary kernels (codes + scales)."""
    leaves = jax.tree.leaves(variables["packed"],
                             is_leaf=lambda x: isinstance(x, PackedTernary))
    return sum(p.nbytes for p in leaves)
