"""What the training loop does between steps, as a schedule: `(every, action)` pairs run under
one paused clock, and the evaluations a runner adds.

    schedule = [Periodic(training.log_every, log), Periodic(training.eval_every, evaluate),
                *[e.periodic(...) for e in evaluators], Periodic(checkpoint.every, save)]
    for periodic in schedule:
        if periodic.due(step, last):
            with clock.paused(state):
                periodic.action(step, state)

`Clock` counts training throughput over the steps since its last `restart`, leaving out the
seconds spent in paused actions (evaluation, saving, logging), so no action restarts it by
hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

Metrics = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Periodic:
    """`action(step, state)` after every `every`-th step and after the last (every 0: never)."""

    every: int
    action: Callable[[int, Any], None]

    def due(self, step: int, last: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last)


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A periodic evaluation a runner hands to `train(config, workdir, evaluators=...)`.

    `build(model, tokenizer)` is called once the model exists and gives `params -> metrics`,
    run every `every` steps and after the last; `describe(metrics)` is the line printed.
    `nanochat_jax.eval.code.training_evaluators(config)` builds the code evaluation."""

    name: str
    every: int
    build: Callable[[Any, Any], Callable[[Any], Metrics]]
    describe: Callable[[Metrics], str]


class Clock:
    """Tokens/s over the steps since `restart`, without the seconds spent in `paused()`."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._pause_start: float | None = None
        self.restart(0)

    def restart(self, step: int) -> None:
        """Count from `step` on (inside a pause: from the pause's start; the pause is left
        out anyway)."""
        self.step, self.excluded = step, 0.0
        self.time = self._pause_start if self._pause_start is not None else time.perf_counter()

    @contextlib.contextmanager
    def paused(self, wait_for: Any = None) -> Iterator[None]:
        """Leave the block's seconds out of the rate; `wait_for` (the train state) is
        finished first, so the steps dispatched before the pause count as training."""
        jax.block_until_ready(wait_for)
        self._pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - self._pause_start
            self._pause_start = None

    def rate(self, step: int) -> float | None:
        """Tokens/s since the restart (None: no step since); inside a pause, up to its start."""
        if step <= self.step:
            return None
        now = self._pause_start if self._pause_start is not None else time.perf_counter()
        return (step - self.step) * self.tokens_per_step / (now - self.time - self.excluded)
