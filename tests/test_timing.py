"""The benchmark scripts' timing: arms alternate within every round, medians are per arm, and
a call's time is the clock's difference over the calls (fake clocks and arms: no timings)."""

import pytest

from experiments.timing import alternating_rounds, medians, per_call, step_seconds


def test_every_round_calls_every_arm_once_in_the_same_order():
    calls, progress = [], []
    samples = iter([3.0, 10.0, 1.0, 30.0, 2.0, 20.0])

    def arm(name):
        return lambda: calls.append(name) or next(samples)

    times = alternating_rounds({"a": arm("a"), "b": arm("b")}, 3,
                               after_round=lambda n, so_far: progress.append(
                                   (n, {k: list(v) for k, v in so_far.items()})))
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert times == {"a": [3.0, 1.0, 2.0], "b": [10.0, 30.0, 20.0]}
    assert progress[0] == (1, {"a": [3.0], "b": [10.0]}) and [n for n, _ in progress] == [1, 2, 3]
    assert medians(times) == {"a": 2.0, "b": 20.0}
    assert medians({"even": [4.0, 1.0, 3.0, 2.0]}) == {"even": 2.5}


def test_an_arm_may_return_any_sample_and_no_rounds_give_no_samples():
    assert alternating_rounds({("x", "forward"): lambda: (0.1, 0.2)}, 2) == {
        ("x", "forward"): [(0.1, 0.2), (0.1, 0.2)]}
    assert alternating_rounds({"a": lambda: pytest.fail("not called")}, 0) == {"a": []}


def test_per_call_divides_the_clock_by_the_calls_and_keeps_the_warmup_out():
    now = [0.0]
    calls = []

    def fn():  # each call takes 2 "seconds" of the fake clock
        calls.append(now[0])
        now[0] += 2.0

    assert per_call(fn, 3, clock=lambda: now[0]) == 2.0 and len(calls) == 3
    now[0] = 0.0
    assert per_call(fn, 4, warmup=True, clock=lambda: now[0]) == 2.0 and len(calls) == 3 + 5


def test_step_seconds_carries_the_state_from_step_to_step():
    run = {"state": 0, "step": lambda state, batch: (state + batch, {"loss": state})}
    step_seconds(run, 5, 2)
    assert run["state"] == 10
