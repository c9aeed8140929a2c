"""`training.profile_steps = "START,COUNT"`: a `jax.profiler` trace of those train steps.

    python -m experiments.run --config=tiny:rust --config.training.profile_steps=5,3
    tensorboard --logdir runs/tiny_rust/profile      # the profile plugin; or open the
                                                     # *.trace.json.gz in ui.perfetto.dev

The trace starts before step START (1-based: the first step is 1, the one that compiles)
and stops after step START + COUNT - 1 has finished on the device, so it holds COUNT whole
steps, each inside a `jax.profiler.StepTraceAnnotation("train", step_num=...)` (the profile
plugin's step view). It is written to `WORKDIR/profile/plugins/profile/<run>/` by every
process (one file per host). The trainer waits for the traced steps to finish before
stopping the trace: a host sync, only then.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from nanochat_jax.errors import ConfigError
from nanochat_jax.train.schedule import Hook

DIRECTORY = "profile"


def parse_steps(setting: str, total_steps: int) -> tuple[int, int] | None:
    """"START,COUNT" -> (START, COUNT), or None for "" (off). Refuses what cannot be traced."""
    if not setting:
        return None
    parts = str(setting).split(",")
    try:
        start, count = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"training.profile_steps={setting!r}: expected START,COUNT (two "
                          f"integers, e.g. 5,3), or '' for no profile") from None
    if start < 1 or count < 1 or start + count - 1 > total_steps:
        raise ConfigError(f"training.profile_steps={setting!r}: steps {start}.."
                          f"{start + count - 1} must lie within 1..{total_steps} (START >= 1, "
                          f"COUNT >= 1)")
    return start, count


class StepProfiler:
    """The trace as two hooks of the loop's schedule (train/schedule.py): `stop_hooks` after
    step START + COUNT - 1, first (the paused hook has waited for it), and `start_hooks`
    last after step START - 1 (after that step's own evaluation and saving: the trace holds
    steps, not them); the loop marks every step with a `StepTraceAnnotation`. `close` stops
    a trace the run ended inside (interrupted before its last profiled step)."""

    def __init__(self, steps: tuple[int, int] | None, workdir: str,
                 say: Callable[[str], Any] = print):
        self.steps, self.say = steps, say
        self.directory = os.path.join(workdir, DIRECTORY)
        self.tracing = False

    def start_hooks(self) -> list[Hook]:
        if self.steps is None:
            return []
        return [Hook(self.start, at=(self.steps[0] - 1,), each_launch=True)]

    def stop_hooks(self) -> list[Hook]:
        if self.steps is None:
            return []
        return [Hook(self.stop, at=(sum(self.steps) - 1,))]

    def start(self, step: int, state: Any) -> None:
        jax.profiler.start_trace(self.directory)
        self.tracing = True

    def stop(self, step: int, state: Any) -> None:
        if not self.tracing:  # resumed inside the profiled steps
            return
        jax.profiler.stop_trace()
        self.tracing = False
        self.say(f"profile of steps {self.steps[0]}..{step} written to {self.directory} "
                 f"(tensorboard --logdir {self.directory}, or ui.perfetto.dev)")

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
