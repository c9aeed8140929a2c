"""The loop's schedule: hooks (every N steps, at given steps), and the clock they pause."""

import pytest

from nanochat_jax.errors import ConfigError
from nanochat_jax.train import schedule
from nanochat_jax.train.schedule import Clock, Hook, run_due
from nanochat_jax.train.validate import validate


def test_a_hook_is_due_every_n_steps_and_after_the_last_and_at_its_steps():
    every_3 = Hook(lambda step, state: None, every=3)
    assert [s for s in range(1, 11) if every_3.due(s, last=10)] == [3, 6, 9, 10]
    at_4 = Hook(lambda step, state: None, at=(0, 4))
    assert [s for s in range(0, 11) if at_4.due(s, last=10)] == [0, 4]
    with pytest.raises(ValueError, match="every must be >= 0"):
        Hook(lambda step, state: None, every=-1)
    with pytest.raises(ValueError, match="give one"):  # a hook that would never run
        Hook(lambda step, state: None)


def test_due_hooks_run_in_order_each_seeing_the_state_the_one_before_returned():
    seen = []

    def add(amount):
        def action(step, state):
            seen.append((step, state))
            return state + amount
        return action

    hooks = [Hook(add(1), every=2), Hook(lambda step, state: seen.append("not due"), every=3),
             Hook(add(10), every=1, paused=False), Hook(add(100), at=(4,))]
    clock = Clock(tokens_per_step=1)
    assert run_due(hooks, 4, 10, 0, clock) == 111
    assert seen == [(4, 0), (4, 1), (4, 11)]
    seen.clear()
    # A launch resumed at 4: its hooks ran before step 4's checkpoint; only a process-local
    # one (each_launch: the profiler's trace) runs again. A fresh run starts its `at=(0,)`.
    assert run_due(hooks, 4, 10, 0, clock, starting=True) == 0 and seen == []
    local = Hook(add(1000), at=(4,), each_launch=True)
    assert run_due([*hooks, local], 4, 10, 0, clock, starting=True) == 1000
    assert run_due([Hook(add(5), at=(0,)), Hook(add(7), every=1)], 0, 10, 0, clock,
                   starting=True) == 5


class _FakeTime:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_the_clock_leaves_paused_seconds_out_of_the_throughput(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(schedule.time, "perf_counter", fake.perf_counter)
    clock = Clock(tokens_per_step=10)
    clock.restart(1)
    fake.now += 2.0  # steps 2..5 train for 2 s
    with clock.paused():
        fake.now += 50.0  # an evaluation: not training
    fake.now += 2.0  # steps 6..9: 2 s more
    assert clock.rate(9) == pytest.approx(8 * 10 / 4.0)
    assert clock.rate(1) is None  # no step since the restart


def test_a_restart_inside_a_pause_counts_from_the_pause(monkeypatch):
    """The log action takes the rate and restarts the clock while paused: the rest of the
    pause (writing the row) is not charged to the next window."""
    fake = _FakeTime()
    monkeypatch.setattr(schedule.time, "perf_counter", fake.perf_counter)
    clock = Clock(tokens_per_step=10)
    fake.now += 4.0
    with clock.paused():
        assert clock.rate(4) == pytest.approx(4 * 10 / 4.0)  # up to the pause's start
        clock.restart(4)
        fake.now += 30.0  # writing the log row, then an evaluation
    fake.now += 1.0
    assert clock.rate(6) == pytest.approx(2 * 10 / 1.0)


def test_code_evaluation_on_a_multi_process_run_is_refused_before_anything_runs(
        small_config, monkeypatch):
    small_config.training.code_eval_every = 10
    monkeypatch.setattr("jax.process_count", lambda: 2)
    with pytest.raises(ConfigError, match="code_eval_every runs on a single process"):
        validate(small_config, n_devices=1)
