"""`training.profile_steps = "START,COUNT"`: a `jax.profiler` trace of those train steps.

    python -m experiments.run --config=tiny:rust --config.training.profile_steps=5,3
    tensorboard --logdir runs/tiny_rust/profile      # the profile plugin; or open the
                                                     # *.trace.json.gz in ui.perfetto.dev

The trace starts before step START (1-based: the first step is 1, the one that compiles)
and stops after step START + COUNT - 1 has finished on the device, so it holds COUNT whole
steps, each inside a `jax.profiler.StepTraceAnnotation("train", step_num=...)` (the profile
plugin's step view). It is written to `WORKDIR/profile/plugins/profile/<run>/` by every
process (one file per host). The trainer waits for the traced steps to finish before
stopping the trace: a host sync, only while profiling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

from nanochat_jax.errors import ConfigError

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
    """Around each train step, numbered as it will be once done (1-based):

        with profiler.annotate(step + 1):
            state, metrics = train_step(state, batch)
        profiler.after(step + 1, (state, metrics))
    """

    def __init__(self, steps: tuple[int, int] | None, workdir: str,
                 say: Callable[[str], Any] = print):
        self.steps, self.say = steps, say
        self.directory = os.path.join(workdir, DIRECTORY)
        self.tracing = False

    @contextlib.contextmanager
    def annotate(self, number: int) -> Iterator[None]:
        """Start the trace at the first profiled step; mark each traced step."""
        if self.steps is not None and number == self.steps[0] and not self.tracing:
            jax.profiler.start_trace(self.directory)
            self.tracing = True
        if not self.tracing:
            yield
            return
        with jax.profiler.StepTraceAnnotation("train", step_num=number):
            yield

    def after(self, number: int, outputs: Any) -> None:
        """After the last profiled step: wait for its `outputs`, stop the trace, say where."""
        if not self.tracing or number != self.steps[0] + self.steps[1] - 1:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.tracing = False
        self.say(f"profile of steps {self.steps[0]}..{number} written to {self.directory} "
                 f"(tensorboard --logdir {self.directory}, or ui.perfetto.dev)")

    def close(self) -> None:
        """Stop a trace a run ended inside (interrupted before its last profiled step)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
