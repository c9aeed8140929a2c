"""What the training loop does between steps, as one schedule of hooks.

    hooks = [Hook(log, every=training.log_every), Hook(evaluate, every=training.eval_every),
             Hook(save, every=checkpoint.every), Hook(fire, at=(optimizer.fire.step,)), ...]
    state = run_due(hooks, step, last, state, clock)     # after every step

Every action of the loop is a hook: logging, validation and the code evaluation, saving,
FIRE, the profiler's start and stop, the stop checks (signals, preemption). Research code
adds its own with `train(config, workdir, hooks=[Hook(action, every=100)])` (levanter's
`add_hook(every=)`). A hook's action gets (step, state) after `step` updates and may return
a new state (FIRE does) or None.

`Clock` counts training throughput over the steps since its last `restart`, leaving out the
seconds spent in the hooks (evaluation, saving, logging), so no action restarts it by
hand; hooks with `paused=False` (per-step bookkeeping that never waits for the device) run
on the clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

Metrics = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Hook:
    """`action(step, state) -> new state or None`, run after every `every`-th step and after
    the last (every 0: not periodically), and at each step count in `at` (0 and the resumed
    step included: `at` hooks also run before the first step of a launch, FIRE at step 0).

    `paused` (default): the clock stops and the state is finished on the device first;
    `paused=False` is for per-step bookkeeping that adds no host sync."""

    action: Callable[[int, Any], Any]
    every: int = 0
    at: tuple[int, ...] = ()
    paused: bool = True
    each_launch: bool = False  # a process-local effect (a trace): see `run_due(starting=)`

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"Hook.every must be >= 0 (0: not periodic), got {self.every}")
        if not self.every and not self.at:
            raise ValueError("a Hook runs every N steps (every=N) or at given steps (at=...): "
                             "give one")

    def due(self, step: int, last: int) -> bool:
        """Whether the hook runs after `step` updates of a run of `last` steps."""
        return step in self.at or (bool(self.every) and (step % self.every == 0
                                                        or step == last))


def run_due(hooks: Sequence[Hook], step: int, last: int, state: Any, clock: Clock,
            starting: bool = False) -> Any:
    """Run the hooks due after `step` updates, in order, each action seeing the state the one
    before it returned; -> the state.

    `starting`: before a launch's first step, only the `at` hooks of `step`: on a fresh run
    (step 0) all of them; on a resumed run only the `each_launch` ones, since every other
    hook due at that step ran before the checkpoint the launch resumes from was saved (the
    loop saves last)."""
    for hook in hooks:
        if starting:
            due = step in hook.at and (step == 0 or hook.each_launch)
        else:
            due = hook.due(step, last)
        if not due:
            continue
        with clock.paused(state) if hook.paused else contextlib.nullcontext():
            new = hook.action(step, state)
        if new is not None:
            state = new
    return state


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
