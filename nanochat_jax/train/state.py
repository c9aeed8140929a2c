"""The train state: one pytree (step, params, opt_state, rng) that orbax saves whole."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from nanochat_jax.train.sharding import train_state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # fp32 latent weights
    opt_state: Any
    rng: jax.Array  # uint32 [2] root key; per-step keys are fold_in(rng, step)
    # Updates skipped because the loss, gradient or update was NaN/inf (train/step.py):
    skipped_steps: jax.Array  # int32 [] in all
    consecutive_skips: jax.Array  # int32 [] in a row up to this step (0 after a good one)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                     seq_len: int, mesh: jax.sharding.Mesh | None = None) -> TrainState:
    """Initialise params and optimizer state on device (one jit-compiled call); with a
    `mesh`, each leaf is created directly in the sharding train/sharding.py's rules give it."""

    def init(key):
        init_key, state_key = jax.random.split(key)
        params = model.init(init_key, jnp.zeros((1, seq_len), jnp.int32))["params"]
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=state_key,
                          skipped_steps=zero, consecutive_skips=zero)

    key = jax.random.PRNGKey(seed)
    shardings = None
    if mesh is not None:
        shardings = train_state_shardings(jax.eval_shape(init, key), mesh)
    return jax.jit(init, out_shardings=shardings)(key)

