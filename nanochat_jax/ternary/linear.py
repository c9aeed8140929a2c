"""ternary_dot: the BitLinear product through the packed-weight kernel, with an STE backward.

Forward (SPECS §1): per-token int8 codes of x, absmean ternary codes of W, an exact int32
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
    """The axes of `axes` in `mesh` (greedily, in order) whose product divides `size`."""
    kept: list[str] = []
    for axis in axes:
        if axis in mesh.axis_names and size % (math.prod(mesh.shape[a] for a in kept)
                                               * mesh.shape[axis]) == 0:
            kept.append(axis)
    return tuple(kept)


def _spec(*dims: tuple[str, ...]) -> P:
    return P(*[(d if len(d) > 1 else d[0]) if d else None for d in dims])


def _per_shard(fn, x: jax.Array, w: jax.Array, layout: Layout | None, *,
               split_k: bool = True, n_unit: int = 1) -> jax.Array:
    """fn(x [M, K], w [K', N']) -> [M, N'] on each shard of the context mesh, as `layout`
    says (summed over the K axes); plain `fn(x, w)` without a mesh or a layout. `split_k`
    False keeps K whole (packed codes interleave K), `n_unit`: N' must stay a multiple."""
    mesh = jax.sharding.get_abstract_mesh()
    if layout is None or mesh.empty or mesh.size == 1:
        return fn(x, w)
    rows = _fit(layout.rows, x.shape[0], mesh)
    k = _fit(layout.k, x.shape[1], mesh) if split_k else ()
    n = _fit(layout.n, w.shape[1] // n_unit, mesh)

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
    mesh I2 codes are split over N only (their rows interleave four K-slabs); CPU tiles
    are not split."""
    lead, k = x.shape[:-1], x.shape[-1]
    x_codes, absmax = quant.int8_codes(x.reshape(-1, k))  # [M, K] int8, [M, 1]

    def matmul(a, codes):  # codes: [K4, Np'] (this shard's columns)
        shard = packing.PackedTernary(codes, w.scale, (k, codes.shape[1]))
        return kernel.ternary_matmul(a, shard, impl=impl)

    if w.layout == "i2":
        acc = _per_shard(matmul, x_codes, w.codes, layout, split_k=False,
                         n_unit=packing.N_ALIGN)[:, : w.shape[1]]  # [M, N] int32, exact
    else:  # CPU tiles: one device's kernel, whole (model.packed.for_cpu makes them)
        acc = kernel.ternary_matmul(x_codes, w, impl=impl)
    y = acc.astype(jnp.float32) * (absmax / quant.INT8_MAX) * w.scale
    return y.astype(x.dtype).reshape(*lead, w.shape[1])


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
