"""Orbax checkpoints: the whole TrainState plus a JSON sidecar (config, data position).

Saves are asynchronous (training continues while the files are written); `max_to_keep`
retention and the save interval are orbax's own `CheckpointManagerOptions`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from nanochat_jax.errors import CheckpointError


class Checkpointer:
    """Save / restore `(state, meta)` pairs under `directory/<step>/`."""

    def __init__(self, directory: str, every: int, max_to_keep: int):
        policies = ocp.checkpoint_managers
        # Every `every` steps, and when JAX's preemption notice arrives on a pod; unlike
        # orbax's default there is no extra save at the first step.
        save_policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every),
                                              policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_decision_policy=save_policy,
            enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Start an async save if `step` is on the interval (or `force`); True if started."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore_meta(self, step: int) -> dict:
        """The JSON sidecar saved with `step` (cheap: no arrays are read)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, like: Any) -> Any:
        """Restore the state at `step` into the structure, shapes and shardings of `like`;
        leaves of `like` without a sharding (shapes only) land on the first local device, so
        a checkpoint saved on any mesh loads on any machine."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(
                x, "sharding", None) or device), like)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint at step {step} in {self.manager.directory} does not fit this "
                f"config's train state ({e}); use a new --workdir or the config it was made "
                f"with") from e

    def close(self) -> None:
        """Wait for pending async saves, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def load_run(workdir: str, step: int | None = None) -> tuple[Any, Any, dict]:
    """(run config, TrainState, meta) of a run's checkpoint at `step` (default: latest),
    rebuilt from the config saved with it."""
    from ml_collections import ConfigDict

    from nanochat_jax.train.state import abstract_train_state

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoints in {workdir}: train a run there first")
    ckpt = Checkpointer(directory, every=1, max_to_keep=None)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.manager.all_steps():
            raise CheckpointError(f"no checkpoint at step {step} in {directory}; saved steps: "
                                  f"{list(ckpt.manager.all_steps())}")
        meta = ckpt.restore_meta(step)
        config = ConfigDict(meta["config"])
        return config, ckpt.restore(step, abstract_train_state(config)), meta
    finally:
        ckpt.close()
