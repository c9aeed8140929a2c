"""Parameter and optimizer-state bytes of a run config, without allocating anything
(`python -m experiments.memory_at_size` prints them per arm and preset).

Shapes come from `jax.eval_shape` of the model init and the optimizer init. Optimizer bytes
are split by the partition groups the composition uses (e.g. muon / adam) when it has them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nanochat_jax.model import config as model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer


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


def state_memory(config) -> dict:
    """{'params', 'params_bytes', 'opt_state_bytes', 'bytes_per_param', 'groups'} for a config."""
    mcfg = model_config.from_run_config(config)
    model = Transformer(mcfg)
    tx, _ = build_optimizer(config.optimizer, config.training.steps)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    state = jax.eval_shape(tx.init, params)
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    opt = tree_bytes(state)
    return {"params": n, "params_bytes": tree_bytes(params), "opt_state_bytes": opt,
            "bytes_per_param": opt / n, "groups": _partition_groups(state)}
