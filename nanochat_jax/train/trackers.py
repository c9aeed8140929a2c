"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases.

    python -m experiments.run --config=tiny:rust --config.logging.wandb=True \\
        [--config.logging.project=P --config.logging.entity=E --config.logging.name=N \\
         --config.logging.mode=auto|online|offline]

Every row the MetricWriter writes goes to `wandb.log(row, step=step)` under the same tags
as TensorBoard's. The W&B run id is kept in each checkpoint's sidecar (`trackers.wandb_id`),
so a resumed run logs to the same W&B run (`wandb.init(id=..., resume="allow")`). W&B
ignores steps at or below the last one it has, so after a crash the steps that were run
twice keep their first values, which deterministic resume makes the same ones. `mode`
"auto" logs online when the W&B server answers and offline otherwise (no network: the run
is written under WORKDIR/wandb; `wandb sync WORKDIR/wandb/offline-run-*` uploads it later).
"""

from __future__ import annotations

import os
import socket

from nanochat_jax.errors import ConfigError

MODES = ("auto", "online", "offline", "disabled")
WANDB_HOST = ("api.wandb.ai", 443)
INSTALL_HINT = "pip install -e '.[trackers]' (wandb)"


def check_logging(logging) -> None:
    """Refuse a bad `logging` group before the run has side effects."""
    if logging.mode not in MODES:
        raise ConfigError(f"unknown logging.mode {logging.mode!r}: choose one of "
                          f"{', '.join(MODES)}")
    if logging.wandb:
        try:
            import wandb  # noqa: F401  (optional dependency)
        except ImportError as e:
            raise ConfigError(f"logging.wandb=True needs wandb: {INSTALL_HINT}; or set "
                              f"logging.wandb=False") from e


def resolve_mode(mode: str, timeout: float = 2.0) -> str:
    """'auto' -> 'online' when the W&B server accepts a connection, else 'offline'."""
    if mode != "auto":
        return mode
    try:
        socket.create_connection(WANDB_HOST, timeout=timeout).close()
        return "online"
    except OSError:
        return "offline"


class WandbSink:
    """One W&B run: `write(step, scalars)` logs a row, `close()` finishes the run.
    `run_id` None starts a new run; a saved id continues that run."""

    def __init__(self, logging, workdir: str, config: dict, run_id: str | None, say=print):
        import wandb

        self.mode = resolve_mode(logging.mode)
        self.run = wandb.init(
            project=logging.project, entity=logging.entity or None,
            name=logging.name or os.path.basename(os.path.abspath(workdir)),
            id=run_id, resume="allow" if run_id else None, dir=workdir, config=config,
            mode=self.mode)  # a new run's id is W&B's own
        self.run_id = self.run.id
        say(f"wandb: run {self.run_id} ({self.mode}) in {self.run.dir}")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
