"""Parameter and optimizer-state bytes of a train state, arrays or shapes alike
(`python -m experiments.memory_at_size` prints them per arm and preset from each run config's
abstract state: nothing allocated).

Optimizer bytes are split by the partition groups the composition uses (e.g. muon / adam)
when it has them.
"""

from __future__ import annotations

from typing import Any

import jax


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "dtype"))


def _partition_groups(state) -> dict[str, int]:
    """Bytes per label of the outermost optax.partition state inside `state` (if any)."""
    groups: dict[str, int] = {}

    def visit(node):
        if groups:
            return
        inner = getattr(node, "inner_states", None)
        if isinstance(inner, dict):
            groups.update({str(k): tree_bytes(v) for k, v in inner.items()})
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif hasattr(node, "_fields"):
            for child in node:
                visit(child)
        elif hasattr(node, "__dataclass_fields__"):
            for f in node.__dataclass_fields__:
                visit(getattr(node, f))

    visit(state)
    return groups


def state_memory(params, opt_state) -> dict:
    """{'params', 'params_bytes', 'opt_state_bytes', 'bytes_per_param', 'groups'} of a train
    state's params and optimizer state (arrays or `jax.ShapeDtypeStruct`s: a run config's
    `nanochat_jax.train.setup.abstract_train_state` allocates nothing)."""
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    opt = tree_bytes(opt_state)
    return {"params": n, "params_bytes": tree_bytes(params), "opt_state_bytes": opt,
            "bytes_per_param": opt / n, "groups": _partition_groups(opt_state)}
