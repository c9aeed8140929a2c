"""ternary_dot: the BitLinear product through the packed-weight kernel, with an STE backward.

Forward (docs/techniques.md#bitnet): per-token int8 codes of x, absmean codes of W, an exact int32
`codes_matmul` (the kernel packs the codes to 2 bits), then `acc * g * absmax / 127`.
Backward is the straight-through estimator of the fake-quant product: `dx = gy W_q^T`,
`dW = x_q^T gy`, both in the compute dtype with fp32 accumulation. `jax.grad` cannot
differentiate a `pallas_call`, hence the `custom_vjp`.

Under a mesh (`jax.set_mesh`) a Pallas kernel cannot be partitioned by XLA, so the integer
product runs per shard inside `jax.shard_map`, with the operand specs a `Layout` gives
(the model derives it from its sharding rules: model/axes.py): x's rows split over the
batch axes, W gathered over the axes that split the batch (FSDP) and split over the others
(tensor parallelism); a split K gives per-shard partial sums, added by an explicit `psum`.
The quantisation scales are computed outside, on the whole (XLA-partitioned) arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nanochat_jax.ternary import kernel, packing, quant


@dataclasses.dataclass(frozen=True)
class Layout:
    """Mesh axes of a ternary product `x [M, K] @ W [K, N]`: `rows` split M (the batch),
    `k` split K (x's columns and W's rows; the products are summed over them), `n` split N.
    Axes the mesh lacks, or whose size does not divide the dimension, are left out."""

    rows: tuple[str, ...] = ()
    k: tuple[str, ...] = ()
    n: tuple[str, ...] = ()


def _fit(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...]:
    """The axes of `axes` in `mesh` (greedily, in order) whose product divides `size`;
    axes of size 1 split nothing and are left out."""
    kept: list[str] = []
    for axis in axes:
        if axis in mesh.axis_names and mesh.shape[axis] > 1 and size % (
                math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
            kept.append(axis)
    return tuple(kept)


def _spec(*dims: tuple[str, ...]) -> P:
    return P(*[(d if len(d) > 1 else d[0]) if d else None for d in dims])


def _per_shard(fn, x: jax.Array, w: jax.Array, layout: Layout | None) -> jax.Array:
    """fn(x [M, K'], w [K', N']) -> [M, N'] on each shard of the context mesh, as `layout`
    says (summed over the K axes); plain `fn(x, w)` without a mesh or a layout."""
    mesh = jax.sharding.get_abstract_mesh()
    if layout is None or mesh.empty or mesh.size == 1:
        return fn(x, w)
    rows = _fit(layout.rows, x.shape[0], mesh)
    k = _fit(layout.k, x.shape[1], mesh)
    n = _fit(layout.n, w.shape[1], mesh)

    def shard(xs, ws):
        out = fn(xs, ws)
        return jax.lax.psum(out, k) if k else out

    return jax.shard_map(shard, mesh=mesh, in_specs=(_spec(rows, k), _spec(k, n)),
                         out_specs=_spec(rows, n), check_vma=False)(x, w)


def int8_ternary_product(x: jax.Array, w: jax.Array, impl: str = "auto",
                         layout: Layout | None = None) -> jax.Array:
    """x [..., K] @ ternary(W [K, N]) with per-token int8 x: the quantised forward (no
    gradient rule of its own; `ternary_dot` and collider.py give it one)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x_codes, absmax = quant.int8_codes(x.reshape(-1, k))  # [M, K] int8, [M, 1]
    w_codes, scale = quant.ternary_codes(w)  # [K, N] int8, []
    matmul = functools.partial(kernel.codes_matmul, impl=impl)
    acc = _per_shard(lambda a, c: matmul(a, c), x_codes, w_codes, layout)  # [M, N] exact
    y = acc.astype(jnp.float32) * (absmax / quant.INT8_MAX) * scale
    return y.astype(x.dtype).reshape(*lead, w.shape[1])


def packed_dot(x: jax.Array, w: packing.PackedTernary, impl: str = "auto",
               layout: Layout | None = None) -> jax.Array:
    """x [..., K] @ a packed ternary weight -> [..., N], activations int8 per token. Under a
    mesh I2 codes run per shard (`_packed_per_shard`); CPU tiles are not split."""
    lead, k = x.shape[:-1], x.shape[-1]
    x_codes, absmax = quant.int8_codes(x.reshape(-1, k))  # [M, K] int8, [M, 1]
    if w.layout == "i2":
        acc = _packed_per_shard(x_codes, w, layout, impl)[:, : w.shape[1]]  # [M, N] exact
    else:  # CPU tiles: one device's kernel, whole (model.packed.for_cpu makes them)
        acc = kernel.ternary_matmul(x_codes, w, impl=impl)
    y = acc.astype(jnp.float32) * (absmax / quant.INT8_MAX) * w.scale
    return y.astype(x.dtype).reshape(*lead, w.shape[1])


def _packed_per_shard(x_codes: jax.Array, w: packing.PackedTernary, layout: Layout | None,
                      impl: str) -> jax.Array:
    """x_codes [M, K] int8 @ I2 codes [K4, Np] -> [M, Np] int32 on each shard of the context
    mesh. Rows of the packed codes interleave four K-slabs (byte row i holds rows i + j K4),
    so a K split takes packed rows t K4' .. (t+1) K4' and, from each of x's four slabs, the
    same K4' columns: x is viewed as [M, 4, K4] and split along its last axis, and each
    shard's [M, 4 K4'] and [K4', Np'] are themselves an I2 product (partial sums, added by
    a `psum`). Shards keep whole `packing.K_ALIGN` packed rows and `N_ALIGN` columns."""
    k4, n_p = w.codes.shape

    def matmul(xs, codes):  # [M', 4 K4'] int8, [K4', Np'] uint8 -> [M', Np'] int32
        shard = packing.PackedTernary(codes, w.scale, (xs.shape[1], codes.shape[1]))
        return kernel.ternary_matmul(xs, shard, impl=impl)

    mesh = jax.sharding.get_abstract_mesh()
    if layout is None or mesh.empty or mesh.size == 1:
        return matmul(jnp.pad(x_codes, ((0, 0), (0, 4 * k4 - x_codes.shape[1]))), w.codes)
    m = x_codes.shape[0]
    rows = _fit(layout.rows, m, mesh)
    k = _fit(layout.k, k4 // packing.K_ALIGN, mesh)
    n = _fit(layout.n, n_p // packing.N_ALIGN, mesh)
    slabs = jnp.pad(x_codes, ((0, 0), (0, 4 * k4 - x_codes.shape[1]))).reshape(m, 4, k4)

    def shard(xs, codes):  # xs [M', 4, K4'], codes [K4', Np']
        out = matmul(xs.reshape(xs.shape[0], -1), codes)
        return jax.lax.psum(out, k) if k else out

    return jax.shard_map(shard, mesh=mesh, in_specs=(_spec(rows, (), k), _spec(k, n)),
                         out_specs=_spec(rows, n), check_vma=False)(slabs, w.codes)


def ste_grads(x: jax.Array, w: jax.Array, gy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dx [..., K], dW [K, N]) of the fake-quant product for the cotangent gy [..., N]:
    dx = gy W_q^T, dW = x_q^T gy; operands in the compute dtype, fp32 accumulation."""
    k, n = w.shape
    x_q = quant.quantize_activations(x).reshape(-1, k)  # [M, K] in x's dtype
    w_q = quant.quantize_weights(w).astype(gy.dtype)  # [K, N]
    gy2 = gy.reshape(-1, n)  # [M, N]
    dx = jnp.dot(gy2, w_q.T, preferred_element_type=jnp.float32)
    dw = jnp.dot(x_q.T, gy2.astype(x_q.dtype), preferred_element_type=jnp.float32)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def ternary_dot(x: jax.Array, w: jax.Array, impl: str = "auto",
                layout: Layout | None = None) -> jax.Array:
    """x [..., K] @ ternary(W [K, N]) with int8 x, via the packed kernel; STE gradients."""
    return int8_ternary_product(x, w, impl, layout)


def _fwd(x, w, impl, layout):
    return ternary_dot(x, w, impl, layout), (x, w)


def _bwd(impl, layout, residuals, gy):
    return ste_grads(*residuals, gy)


ternary_dot.defvjp(_fwd, _bwd)
