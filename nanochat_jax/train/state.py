"""The train state: one pytree (step, params, opt_state, rng) that orbax saves whole."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # fp32 latent weights
    opt_state: Any
    rng: jax.Array  # uint32 [2] root key; per-step keys are fold_in(rng, step)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                     seq_len: int, shardings: TrainState | None = None) -> TrainState:
    """Initialise params and optimizer state on device (one jit-compiled call), each leaf
    created directly in its sharding when `shardings` are given."""

    @functools.partial(jax.jit, out_shardings=shardings)
    def init(key):
        init_key, state_key = jax.random.split(key)
        params = model.init(init_key, jnp.zeros((1, seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=state_key)

    return init(jax.random.PRNGKey(seed))


def abstract_train_state(config) -> TrainState:
    """Shapes and dtypes of the TrainState a run config trains (nothing allocated)."""
    from nanochat_jax.model import config as model_config
    from nanochat_jax.model.transformer import Transformer
    from nanochat_jax.optim.factory import build_optimizer

    mcfg = model_config.from_run_config(config)
    tx, _ = build_optimizer(config.optimizer, config.training.steps)
    return jax.eval_shape(
        lambda: init_train_state(Transformer(mcfg), tx, config.training.seed, mcfg.seq_len))
