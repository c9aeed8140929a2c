"""The model's sharding rules (docs/design.md#sharding-by-logical-axes): mesh axes per logical name;
the logical names of each parameter's dimensions are its row of model/params.py `PARAMS`.
train/sharding.py places arrays by them; BitLinear reads them to run the ternary kernel per
shard (ternary/linear.py `Layout`).

- FSDP: the `embed` dimension of every matrix is split over `fsdp`, so parameters and the
  optimizer states that mirror them live 1/fsdp per device;
- tensor parallelism: `heads`, `mlp` and `vocab` dimensions are split over `tensor`;
- data parallelism: the batch is split over `data` x `fsdp`.
"""

from __future__ import annotations

from typing import Any

from nanochat_jax.model.params import logical_axes
from nanochat_jax.ternary.linear import Layout

AXES = ("data", "fsdp", "tensor")
# logical name -> mesh axes (flax.linen.logical_to_mesh_axes format)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def mesh_axes(logical: str | None) -> tuple[str, ...]:
    """The mesh axes a logical axis name maps to (empty: not split)."""
    for name, axes in LOGICAL_RULES:
        if name == logical:
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def kernel_layout(name: str) -> Layout | None:
    """How the ternary product with the `[K, N]` kernel `name` runs per shard: x's rows over
    the batch axes; the kernel gathered over those (FSDP) and split over the rest of its
    dimensions' axes (tensor parallelism). None for a kernel with no rule."""
    axes = logical_axes(name)
    if not axes:
        return None
    rows = mesh_axes("batch")
    k, n = (tuple(a for a in mesh_axes(dim) if a not in rows) for dim in axes)
    return Layout(rows=rows, k=k, n=n)
