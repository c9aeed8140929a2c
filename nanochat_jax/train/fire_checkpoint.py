"""FIRE on a run's checkpoint (docs/techniques.md#fire), as a new run that the runner resumes.

`fire_checkpoint` restores a run's latest (or a given step's) checkpoint, applies FIRE, and
saves it at the same step in a new workdir's checkpoints; `python -m experiments.run
--config=... --workdir=NEW` (the same config, more steps) then resumes from it. The command is
`python -m nanochat_jax.cli.fire`.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from nanochat_jax.errors import CheckpointError
from nanochat_jax.model.params import is_hidden
from nanochat_jax.optim.fire import ITERS, apply_fire, isometry_error
from nanochat_jax.train.checkpoint import Checkpointer, load_run


def fire_checkpoint(workdir: str, out: str, step: int | None = None, iters: int = ITERS
                    ) -> dict[str, Any]:
    """Apply FIRE to a run's checkpoint and save it, at the same step, as a new run in `out`.

    Returns a summary: the step, the number of re-initialised leaves and the largest
    isometry error (see `isometry_error`) among them.
    """
    dst_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(dst_dir) and os.listdir(dst_dir):
        raise CheckpointError(f"{dst_dir} already holds checkpoints; choose a new --out")
    config, state, meta = load_run(workdir, step)
    step = meta["step"]

    fired = jax.jit(apply_fire, static_argnames=("iters", "select"))(state, iters=iters)
    errors = [float(isometry_error(x)) for path, x in
              jax.tree_util.tree_flatten_with_path(fired.params)[0] if is_hidden(path, x)]
    meta = {**meta, "fire": {"iters": iters, "from": os.path.abspath(workdir), "step": step}}
    dst = Checkpointer(dst_dir, config.checkpoint.every, config.checkpoint.max_to_keep)
    try:
        dst.save(step, fired, meta)
    finally:
        dst.close()
    return {"step": step, "leaves": len(errors), "max_isometry_error": max(errors, default=0.0)}

