"""Parameter and optimizer-state bytes of a run config, without allocating anything.

    python -m nanochat_jax.optim.memory --config=e3_muon_8bit [--preset=1b]

Shapes come from `jax.eval_shape` of the model init and the optimizer init. Optimizer bytes
are split by the partition groups the composition uses (e.g. muon / adam) when it has them.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from nanochat_jax.model import config as model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer
from nanochat_jax.train.metrics import tree_bytes


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


def main() -> None:
    from experiments.run import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="e3_muon", help="config NAME(s), comma-separated")
    p.add_argument("--preset", default=None, help="model preset(s), comma-separated")
    a = p.parse_args()
    print("| config | optimizer | preset | params | param bytes | opt-state bytes | "
          "opt bytes/param | groups |\n|---|---|---|---|---|---|---|---|")
    for name in a.config.split(","):
        config = load_config(name)
        for preset in (a.preset.split(",") if a.preset else [config.model.preset]):
            config.model.preset = preset
            config.model.vocab_size = max(config.model.vocab_size, config.data.vocab_size)
            m = state_memory(config)
            groups = ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in m["groups"].items())
            print(f"| {name} | {config.optimizer.name} | {preset} | {m['params']:,} | "
                  f"{m['params_bytes']:,} | {m['opt_state_bytes']:,} | "
                  f"{m['bytes_per_param']:.3f} | {groups} |", flush=True)


if __name__ == "__main__":
    main()
