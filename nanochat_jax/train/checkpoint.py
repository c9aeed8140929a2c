"""Orbax checkpoints: the whole TrainState plus a JSON sidecar (config, data position,
content checksums), written so that no crash or damaged file costs more than one interval.

Saves are asynchronous (training continues while the files are written) into a temporary
directory that orbax renames when complete; a save cut short by a kill leaves only that
directory, which the next run's manager deletes (`cleanup_tmp_directories`). Each save also
records two 32-bit checksums per leaf of the state, computed on device; a restore recomputes
them, so a flipped bit or a truncated file is caught even where the storage format would
read it back silently. `restore_newest` walks back from the newest step to the newest one
that reads back intact, names each damaged step and (when training) moves it aside.
Retention (`max_to_keep`) and the save interval are orbax's own `CheckpointManagerOptions`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from nanochat_jax.data.pipeline import corpus_spec
from nanochat_jax.errors import CheckpointError
from nanochat_jax.model import config as model_config
from nanochat_jax.model.params import path_name
from nanochat_jax.train.setup import abstract_train_state

FORMAT = 2  # 2: TrainState with skip counters, checksums in the sidecar; 1: neither
_COUNTERS = ("skipped_steps", "consecutive_skips")


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 [2]: the sum of the leaf's bit patterns and their sum weighted by (2i + 1)
    for flat index i. Any single changed element changes the second (odd weights are
    invertible mod 2^32); the reductions are integer, so every mesh gives the same value."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)  # row-major flat index, built without a reshape
    for d, n in enumerate(x.shape):  # (a reshape of a sharded array would move data)
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                      jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)])


@jax.jit
def _checksums(tree: Any) -> Any:
    return jax.tree.map(_leaf_checksum, tree)


def checksums(tree: Any) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of a pytree of arrays (one device call)."""
    sums = jax.device_get(_checksums(tree))
    return {path_name(p): [int(v) for v in np.asarray(s)]
            for p, s in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _first_line(e: BaseException, limit: int = 240) -> str:
    """A one-line summary of an exception (orbax / TensorStore messages run to pages)."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text.split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:limit]}"


class Checkpointer:
    """Save / restore `(state, meta)` pairs under `directory/<step>/`. `read_only` opens a
    run's checkpoints without creating or cleaning anything (for loading a run that may
    still be training: its in-progress save must survive); such a one is never saved to."""

    def __init__(self, directory: str, every: int, max_to_keep: int | None, *,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        policies = ocp.checkpoint_managers
        # Every `every` steps, and when JAX's preemption notice arrives on a pod; unlike
        # orbax's default there is no extra save at the first step.
        save_policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(every),
                                              policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_decision_policy=save_policy,
            enable_async_checkpointing=True, create=not read_only,
            cleanup_tmp_directories=not read_only)  # (orbax's read_only option warns twice)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Complete (renamed) checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether the save policy asks for a checkpoint after `step`."""
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """Whether every process of a multi-process job has agreed to stop after `step`: JAX's
        preemption sync point, reached on all hosts at the same step once any host got
        SIGTERM (orbax's multihost check; False in a single process). Call it after every
        step on every process."""
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an async save of `state` at `step`, with the state's checksums in `meta`."""
        meta = {**meta, "format": FORMAT, "checksums": checksums(state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_meta(self, step: int) -> dict:
        """The JSON sidecar saved with `step` (cheap: no arrays are read)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # missing, truncated or garbled JSON
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has an "
                                  f"unreadable sidecar ({_first_line(e)})") from e

    def newest_meta(self) -> dict | None:
        """The sidecar of the newest step whose sidecar reads back (None: no steps); damaged
        steps are skipped silently here (`restore_newest` reports them)."""
        for step in reversed(self.steps()):
            try:
                return self.restore_meta(step)
            except CheckpointError:
                continue
        return None

    def restore(self, step: int, like: Any, meta: dict | None = None) -> Any:
        """The state at `step` in the structure, shapes and shardings of `like` (leaves
        without a sharding land on the first local device, so a checkpoint saved on any
        mesh loads on any machine), checked against the checksums in its sidecar.
        Raises CheckpointError naming what is damaged or does not fit."""
        meta = self.restore_meta(step) if meta is None else meta
        old = meta.get("format", 1) < 2
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(
                x, "sharding", None) or device), like)
        if old:  # written before the skip counters existed: restore the other fields
            abstract = {k: getattr(abstract, k) for k in ("step", "params", "opt_state", "rng")}
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this config's "
                f"train state ({_first_line(e)}); use a new --workdir or the config it was "
                f"made with") from e
        except Exception as e:  # TensorStore: missing / truncated / unreadable files
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be "
                                  f"read ({_first_line(e)})") from e
        if old:
            zero = jnp.zeros((), jnp.int32)
            return like.replace(**state, **dict.fromkeys(_COUNTERS, zero))
        saved, now = meta["checksums"], checksums(state)
        damaged = sorted(k for k in saved if now.get(k) != saved[k])
        if damaged or saved.keys() != now.keys():
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is damaged: "
                f"{len(damaged)} of {len(saved)} arrays differ from the checksums saved with "
                f"them ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''})")
        return state

    def restore_newest(self, like_for: Callable[[dict], Any], *,
                       say: Callable[[str], None] = print, set_aside: bool = False
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that reads back intact; None if there
        are none. `like_for(meta)` gives the state to restore into and may raise to refuse
        the run (a different model or data): that error ends the search. Damaged steps are
        reported by name through `say` and, with `set_aside`, moved to
        `<directory>-damaged/` so training can write those steps again; if no step reads
        back, CheckpointError lists why for each."""
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                meta = self.restore_meta(step)
            except CheckpointError as e:
                damaged.append((step, self._reason(step, e)))
                continue
            like = like_for(meta)  # a refusal (CheckpointError) ends the search
            try:
                state = self.restore(step, like, meta)
            except CheckpointError as e:
                damaged.append((step, self._reason(step, e)))
                continue
            for bad, why in damaged:
                say(f"checkpoint step {bad} {why}: skipped"
                    + (f", moved to {self._set_aside(bad)}" if set_aside else ""))
            if damaged:
                say(f"resuming from the newest intact checkpoint, step {step}")
            return step, state, meta
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(
                f"step {s} {why}" for s, why in damaged))
        return None

    def _reason(self, step: int, e: CheckpointError) -> str:
        return str(e).removeprefix(f"checkpoint step {step} in {self.directory} ")

    def _set_aside(self, step: int) -> str:
        """Move a damaged step out of the manager's directory (process 0; all wait)."""
        target = os.path.join(f"{self.directory}-damaged",
                              f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return target

    def close(self) -> None:
        """Wait for pending async saves, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def load_run(workdir: str, step: int | None = None, *, say: Callable[[str], None] = print
             ) -> tuple[Any, Any, dict]:
    """(run config, TrainState, meta) of a run's checkpoint at `step` (default: the newest
    intact one; damaged newer steps are reported through `say` and left in place), rebuilt
    from the config saved with it."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoints in {workdir}: train a run there first")
    ckpt = Checkpointer(directory, every=1, max_to_keep=None, read_only=True)
    try:
        if step is not None and step not in ckpt.steps():
            raise CheckpointError(f"no checkpoint at step {step} in {directory}; saved steps: "
                                  f"{ckpt.steps()}")
        if step is not None:
            meta = ckpt.restore_meta(step)
            config = ConfigDict(meta["config"])
            return config, ckpt.restore(step, abstract_train_state(config), meta), meta
        found = ckpt.restore_newest(  # each step restored into its own saved config's state
            lambda meta: abstract_train_state(ConfigDict(meta["config"])), say=say)
        if found is None:
            raise CheckpointError(f"no checkpoints in {directory}: train a run there first")
        _, state, meta = found
        return ConfigDict(meta["config"]), state, meta
    finally:
        ckpt.close()


# Resuming: the checks `train` runs on the newest checkpoint before any data or compile work.

def newest_sidecar(directory: str) -> dict | None:
    """The sidecar of the newest checkpoint whose sidecar reads back (None: no checkpoint);
    read-only, so a refused resume leaves the directory as it was."""
    if not os.path.isdir(directory):
        return None
    ckpt = Checkpointer(directory, every=1, max_to_keep=None, read_only=True)
    try:
        return ckpt.newest_meta()
    finally:
        ckpt.close()


def check_resumable(saved: dict, config: ConfigDict,
                    mcfg: model_config.ModelConfig, workdir: str) -> None:
    """Refuse, before any data or compile work, to resume a checkpoint made with a different
    model (the whole architecture: the `model` group and the mtp / loop / mhc settings) or
    from a corpus built with different settings (source, size, tokenizer vocabulary)."""
    saved_config = ConfigDict(saved["config"])
    before = dataclasses.asdict(model_config.from_run_config(saved_config))
    now = dataclasses.asdict(mcfg)
    diff = {k: (before[k], now[k]) for k in now
            if before.get(k) != now[k] and k not in model_config.HOW_IT_COMPUTES}
    if diff:
        raise CheckpointError(
            f"{workdir} holds a checkpoint of a different model (saved, configured): {diff}; "
            f"use a new --workdir or the saved settings")
    before = dataclasses.asdict(corpus_spec(saved_config))
    now = dataclasses.asdict(corpus_spec(config))
    diff = {f"data.{k}": (before[k], now[k]) for k in now if before[k] != now[k]}
    if diff:
        raise CheckpointError(
            f"{workdir} was trained on a corpus and tokenizer built with other data settings "
            f"(saved, configured): {diff}; resuming would not continue the same run: use "
            f"the saved settings or a new --workdir")


def check_same_data(saved: dict, data_identity: dict, workdir: str) -> None:
    """Refuse to resume on other tokens than the checkpoint saw (a prebuilt corpus_dir)."""
    for key in ("tokenizer", "corpus_sha256"):
        if saved["data"][key] != data_identity[key]:
            raise CheckpointError(
                f"{workdir} was trained with {key} {saved['data'][key]}, but this run has "
                f"{data_identity[key]}: resuming would not continue the same run; use the "
                f"original data settings or a new --workdir")
