"""Sharding rules of the model's parameters: logical axis names per parameter, mesh axes per
logical name (DESIGN principle 5). train/sharding.py places arrays by them; BitLinear reads
them to run the ternary kernel per shard (ternary/linear.py `Layout`).

- FSDP: the `embed` dimension of every matrix is split over `fsdp`, so parameters and the
  optimizer states that mirror them live 1/fsdp per device;
- tensor parallelism: `heads`, `mlp` and `vocab` dimensions are split over `tensor`;
- data parallelism: the batch is split over `data` x `fsdp`.
"""

from __future__ import annotations

import re
from typing import Any

from nanochat_jax.ternary.linear import Layout

AXES = ("data", "fsdp", "tensor")
STACK = "blocks"  # the nn.scan'd block stack (model.scan_layers): `blocks/block/...` [L, ...]

# "/"-joined Flax path (searched) -> logical name of each dimension (None: never split).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed/embedding$", ("vocab", "embed")),
    (r"^lm_head$", ("embed", "vocab")),
    (r"/attn/(q|k|v)/kernel$", ("embed", "heads")),
    (r"/attn/o/kernel$", ("heads", "embed")),
    (r"/ffn/(w1|w3)/kernel$", ("embed", "mlp")),
    (r"/ffn/w2/kernel$", ("mlp", "embed")),
    (r"(^|/)proj/kernel$", (None, "embed")),  # MTP: [2D, D] from [h; emb]
    (r"/phi$", ("embed", None)),  # mHC: [n D, n^2 + 2n]
    (r"(^|/)exit_gate/kernel$", ("embed", None)),  # LoopLM: [D, 1]
    (r"/(scale|bias|alpha|b_pre|b_post|b_res)$", ()),  # norms and small vectors: replicated
)

# logical name -> mesh axes (flax.linen.logical_to_mesh_axes format)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def logical_axes(name: str) -> tuple[str | None, ...] | None:
    """The logical axis names of parameter `name` (None if no rule matches)."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):
            return axes
    return None


def param_axes(name: str) -> tuple[str | None, ...] | None:
    """The logical axes of a whole parameter: `logical_axes`, with the leading layer axis of
    the `nn.scan`'d stack (`blocks/...`, model.scan_layers) never split."""
    axes = logical_axes(name)
    if axes and name.split("/")[0] == STACK:
        return (None, *axes)
    return axes


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
