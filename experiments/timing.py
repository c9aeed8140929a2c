"""Timing for the benchmark scripts: arms timed in alternating rounds, medians reported.

Every arm is compiled (warmed up) first; then each round times every arm once, in the same
order, so machine noise (another process, a thermal step) hits all arms alike instead of
the one that happened to run at the time; the median over rounds drops the outliers.

    arms = {"dense": lambda: per_call(dense, 10), "ternary": lambda: per_call(tern, 10)}
    ms = {name: 1e3 * sec for name, sec in medians(alternating_rounds(arms, 5)).items()}
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import jax

Arm = TypeVar("Arm", bound=Hashable)
Sample = TypeVar("Sample")


def per_call(fn: Callable[[], Any], calls: int, *, warmup: bool = False,
             clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of `fn` over `calls` calls timed together, the last result waited
    for (`jax.block_until_ready`: dispatch is asynchronous); with `warmup`, one untimed
    call first. A stateful step threads its state through the closure."""
    if calls < 1:
        raise ValueError(f"per_call times at least one call, got calls={calls}")
    if warmup:
        jax.block_until_ready(fn())
    start = clock()
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (clock() - start) / calls


def step_seconds(run: dict, steps: int, *batch) -> float:
    """Seconds per train step over `steps` steps of `run["step"](run["state"], *batch)`
    (-> (state, metrics)), the state carried on in `run` (a donated state is not reused)."""
    def one_step():
        run["state"], metrics = run["step"](run["state"], *batch)
        return metrics

    return per_call(one_step, steps)


def alternating_rounds(arms: Mapping[Arm, Callable[[], Sample]], rounds: int, *,
                       after_round: Callable[[int, dict[Arm, list[Sample]]], None] | None = None
                       ) -> dict[Arm, list[Sample]]:
    """Each arm's samples, one per round: `rounds` rounds, each calling every arm once in
    the order of `arms` (an arm returns its sample: seconds, or what it measured).
    `after_round(n, samples)`, when given, runs after round n (1-based) with the samples so
    far: a progress line, or a result file rewritten so that a run cut short keeps the
    rounds it finished."""
    samples: dict[Arm, list[Sample]] = {name: [] for name in arms}
    for n in range(1, rounds + 1):
        for name, arm in arms.items():
            samples[name].append(arm())
        if after_round is not None:
            after_round(n, samples)
    return samples


def medians(samples: Mapping[Arm, list[float]]) -> dict[Arm, float]:
    """The median of each arm's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}
