"""Crash safety through the real command: a run is killed (SIGKILL at random steps and in
the middle of an async checkpoint write, SIGTERM as a scheduler sends it) and re-launched
with the same command line each time; it ends on the loss curve of a run never killed."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 60
ARGS = ["--config=tiny", "--config.model.n_layers=2", "--config.model.seq_len=64",
        "--config.data.batch_size=8", "--config.data.max_bytes=600000",
        "--config.training.log_every=1", "--config.training.eval_every=15",
        "--config.training.eval_batches=2", "--config.training.peak_flops=1e11",
        "--config.optimizer.warmup_steps=2", "--config.checkpoint.every=2",
        f"--config.training.steps={STEPS}"]


class Run:
    """One launch of `python -m experiments.run ARGS --workdir=W`, output to files."""

    def __init__(self, workdir, env, n, extra=()):
        self.workdir, self.log = workdir, os.path.join(os.path.dirname(workdir), f"launch{n}")
        with open(self.log + ".out", "w") as out, open(self.log + ".err", "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "experiments.run", *ARGS, f"--workdir={workdir}",
                 *extra], cwd=REPO, env=env, stdout=out, stderr=err)

    def output(self):
        return open(self.log + ".out").read(), open(self.log + ".err").read()

    def logged_step(self) -> int:
        """The last step with a complete row in metrics.jsonl (0 if none yet)."""
        try:
            with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
                lines = [line for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return 0
        return json.loads(lines[-1])["step"] if lines else 0

    def saving(self) -> list[str]:
        """Checkpoint directories being written (orbax's not yet renamed temporaries)."""
        directory = os.path.join(self.workdir, "checkpoints")
        names = os.listdir(directory) if os.path.isdir(directory) else []
        return [n for n in names if ".orbax-checkpoint-tmp" in n]

    def kill_when(self, ready, sig=signal.SIGKILL, timeout=240) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, ("the run ended before the kill", self.output())
            assert time.monotonic() < deadline, ("no kill point reached", self.output())
            time.sleep(0.001)
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)


def complete_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def curve(workdir) -> list[tuple]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r.get("loss/total"), r.get("eval/ce")) for r in rows
            if "loss/total" in r or "eval/ce" in r]


@pytest.mark.slow
def test_runs_killed_at_random_moments_resume_on_the_uninterrupted_curve(tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1",  # (output of a kill)
           # the persistent compilation cache makes the 7 launches start faster
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    os.makedirs(tmp_path / "straight")
    straight = Run(str(tmp_path / "straight" / "run"), env, 0)
    assert straight.proc.wait(timeout=600) == 0, straight.output()
    workdir = str(tmp_path / "killed" / "run")
    os.makedirs(os.path.dirname(workdir))
    plan = [(signal.SIGKILL, "at a random step"), (signal.SIGKILL, "during a checkpoint write"),
            (signal.SIGTERM, "at a random step"), (signal.SIGKILL, "at a random step"),
            (signal.SIGINT, "at a random step")]
    resumed_from = []
    for n, (sig, when) in enumerate(plan, 1):
        newest = max(complete_steps(workdir), default=None)
        run = Run(workdir, env, n)
        if when == "during a checkpoint write":
            # after "model:", printed once the manager has cleaned up earlier leftovers
            run.kill_when(lambda r=run: "model:" in r.output()[0] and r.saving())
            assert run.saving(), (seed, "the write had finished before the kill landed")
        else:  # a random step, once this launch has a complete checkpoint of its own
            target = run.logged_step() + rng.randint(3, 7)
            run.kill_when(lambda r=run, t=target, s=newest: r.logged_step() >= t and max(
                complete_steps(workdir), default=-1) > (s or 0), sig)
        out, err = run.output()
        if sig == signal.SIGKILL:
            assert run.proc.returncode == -signal.SIGKILL
        else:  # SIGTERM / SIGINT: a final checkpoint and a clean exit
            assert run.proc.returncode == 0, (seed, err[-2000:])
            assert f"{sig.name} received: stopped at step" in out, (seed, out)
        if newest is not None:  # resumed from the newest complete checkpoint there was
            assert f"resumed from {workdir} at step {newest}" in out, (seed, out)
            resumed_from.append(newest)
    newest = max(complete_steps(workdir))
    last = Run(workdir, env, len(plan) + 1)
    assert last.proc.wait(timeout=600) == 0, (seed, last.output())
    assert f"resumed from {workdir} at step {newest}" in last.output()[0], seed
    resumed_from.append(newest)
    assert not last.saving()  # the cut-short write was cleaned up, nothing left behind
    assert curve(workdir) == curve(straight.workdir), seed
    assert len(resumed_from) == len(plan), (seed, resumed_from)
    print(f"seed {seed}: {', '.join(f'{s.name} {w}' for s, w in plan)}; the launches after "
          f"resumed from steps {resumed_from}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir, env, launch):
    """The same command twice, as processes 0 and 1 of one job on localhost."""
    port = _free_port()
    return [Run(workdir, env, f"{launch}_p{i}", [
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
        "--config.checkpoint.every=20"]) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_job_stops_both_at_the_same_step(tmp_path):
    """A preempted host gets SIGTERM, the others do not: JAX's preemption sync point (orbax's
    multihost check) stops every process after the same step, which they save together;
    the same command resumes both from it. A per-process flag would leave process 0 waiting
    in a collective for process 1, which had stopped."""
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = _two_processes(workdir, env, "first")
    first[1].kill_when(lambda: first[0].logged_step() >= 5, signal.SIGTERM)  # only process 1
    assert first[0].proc.wait(timeout=300) == 0, first[0].output()
    assert first[1].proc.returncode == 0, first[1].output()
    out = first[0].output()[0]  # process 0 prints for the job
    said = [line for line in out.splitlines() if "agreed by every process" in line]
    assert said, out
    stopped = int(said[0].split("stopped at step ")[1].split(";")[0])
    assert 5 <= stopped < STEPS and complete_steps(workdir)[-1] == stopped
    second = _two_processes(workdir, env, "second")
    assert [r.proc.wait(timeout=300) for r in second] == [0, 0], second[1].output()
    assert f"resumed from {workdir} at step {stopped}" in second[0].output()[0]
    assert complete_steps(workdir)[-1] == STEPS

