"""One recipe from a run config to everything a train step needs.

    built = setup(config, mesh, pad_id=tokenizer.pad_id, token_bytes=tokenizer.token_bytes)
    state, metrics = built.train_step(built.state, tokens, *built.step_extra)
    evaluated = built.eval_step(state.params, tokens)

The trainer, `experiments/compile.py`, every benchmark and the studies call `setup`; nothing
else builds the optimizer or the steps of a run config. The model config is derived once
(`validate` returns it; pass it as `model_config=`), and a variant of it (a benchmark's dense
twin) is passed the same way. Reading a saved run (inference, evaluation, the resume check,
Collider's reference model) derives its model config alone (`model.config.from_run_config`).

With a mesh, the state is created in the shardings train/sharding.py's rules give it and
the steps are jitted with those in/out shardings; trace and call them under
`jax.set_mesh(mesh)` so the ternary kernel runs per shard. `abstract=True` makes the state
`jax.ShapeDtypeStruct`s (placed on the mesh's shardings) for ahead-of-time compiles: nothing
is allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nanochat_jax.losses import Objective
from nanochat_jax.model import config as model_config_lib
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer
from nanochat_jax.train import sharding
from nanochat_jax.train.state import TrainState, init_train_state
from nanochat_jax.train.step import (
    StepShardings,
    build_objective,
    make_eval_step,
    make_train_step,
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `setup` builds from a run config. `state` is the initial TrainState (abstract
    with `abstract=True`); `train_step(state, tokens [B, T+1], *step_extra)` and
    `eval_step(params, tokens)` are jitted once (eval_step None without `token_bytes`)."""

    model_config: model_config_lib.ModelConfig
    model: Transformer
    optimizer: optax.GradientTransformation
    learning_rate: Callable[[Any], Any]  # step -> rate (the schedule `training/lr` logs)
    objective: Objective
    state: TrainState
    shardings: StepShardings | None  # None without a mesh
    train_step: Callable
    eval_step: Callable | None
    reference: Transformer | None  # Collider's excess-loss reference model
    reference_params: Any

    @property
    def step_extra(self) -> tuple:
        """The train step's arguments after (state, tokens): the reference's params."""
        return () if self.reference is None else (self.reference_params,)


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None, *,
          model_config: model_config_lib.ModelConfig | None = None, pad_id: int = 0,
          token_bytes: np.ndarray | None = None,
          reference: tuple[Transformer, Any] | None = None, abstract: bool = False,
          seed: int | None = None) -> Setup:
    """The model, optimizer, initial state and jitted steps of the run `config`.

    model_config: the run's ModelConfig (default derived from `config`); pad_id: the
    tokenizer's PAD (masked out of the loss; -1 for random benchmark tokens); token_bytes:
    the tokenizer's bytes per id, [vocab] (makes `eval_step`); reference: (model, params) of
    Collider's excess-loss reference run, its params placed by the mesh's rules; seed:
    default `training.seed`."""
    mcfg = model_config or model_config_lib.from_run_config(config)
    training = config.training
    model = Transformer(mcfg)
    tx, learning_rate = build_optimizer(config.optimizer, training.steps)
    seed = training.seed if seed is None else seed
    if abstract:
        state = jax.eval_shape(lambda: init_train_state(model, tx, seed, mcfg.seq_len))
    else:
        state = init_train_state(model, tx, seed, mcfg.seq_len, mesh)
    reference_model, reference_params = reference if reference is not None else (None, None)
    shardings = None
    if mesh is not None:
        if reference_params is not None:
            reference_params = jax.device_put(reference_params, sharding.named(
                sharding.param_specs(reference_params, mesh), mesh))
        shardings = _shardings(mesh, state, reference_params, abstract)
        if abstract:
            state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 state, shardings.state)
    objective = build_objective(config, pad_id, mcfg)
    train_step = make_train_step(model, tx, learning_rate, objective, reference_model,
                                 grad_accum=training.grad_accum, shardings=shardings)
    eval_step = None
    if token_bytes is not None:
        eval_step = make_eval_step(model, jnp.asarray(token_bytes), pad_id=pad_id,
                                   vocab_chunk=training.vocab_chunk, shardings=shardings)
    return Setup(model_config=mcfg, model=model, optimizer=tx, learning_rate=learning_rate,
                 objective=objective, state=state, shardings=shardings, train_step=train_step,
                 eval_step=eval_step, reference=reference_model,
                 reference_params=reference_params)


def _shardings(mesh: jax.sharding.Mesh, state, reference_params, abstract: bool
               ) -> StepShardings:
    """The steps' in/out shardings: those the placed state has, or (abstract) those the
    rules give it."""
    if not abstract:
        return StepShardings.on(mesh, state, reference_params)
    return StepShardings(state=sharding.train_state_shardings(state, mesh),
                         batch=sharding.batch_sharding(mesh),
                         reference=jax.tree.map(lambda x: x.sharding, reference_params),
                         replicated=sharding.replicated(mesh))


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """Shapes and dtypes of the TrainState a run config trains (nothing allocated, nothing
    compiled): what a checkpoint of the run restores into."""
    return setup(config, abstract=True).state
