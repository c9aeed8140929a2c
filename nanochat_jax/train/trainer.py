"""The experiment runner loop: data -> jitted train_step -> metrics / eval / checkpoints.

`train(config, workdir)` runs or resumes the job described by a run config (see
`experiments/configs/base.py`). Re-running with the same workdir resumes from the latest
checkpoint and reproduces the uninterrupted loss curve: batches are a function of the step
and the RNG lives in the saved state. SIGINT / SIGTERM (Ctrl-C, pod preemption) stop after
the current step with a checkpoint; after a SIGKILL the newest complete, intact checkpoint
is the resume point (train/checkpoint.py). Steps with NaN/inf values are skipped on device;
`training.max_consecutive_skips` in a row stop the run (BUILD.md#faults-kills-damaged-files-nan).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from nanochat_jax.data.loader import BatchSource, Prefetcher, to_device
from nanochat_jax.data.pipeline import open_data
from nanochat_jax.errors import ConfigError, DivergenceError
from nanochat_jax.model import config as model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.fire import apply_fire
from nanochat_jax.optim.memory import tree_bytes
from nanochat_jax.train import metrics as metrics_lib
from nanochat_jax.train import sharding as sharding_lib
from nanochat_jax.train import trackers
from nanochat_jax.train.checkpoint import (
    Checkpointer,
    check_resumable,
    check_same_data,
    load_run,
    newest_sidecar,
)
from nanochat_jax.train.profile import StepProfiler, parse_steps
from nanochat_jax.train.schedule import Clock, Evaluator, Hook, run_due
from nanochat_jax.train.setup import Setup, setup
from nanochat_jax.train.step import tune_kernel_tiles
from nanochat_jax.train.validate import check_workdir, validate


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps. In a multi-process
    job SIGTERM is left to JAX's preemption notifier (the coordination service tells every
    process, and `Checkpointer.reached_preemption` stops them all at the same step): a
    per-process flag would stop only the signalled host and leave the others waiting in a
    collective."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signal = None
        self.signals = signals
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _reference(config: ml_collections.ConfigDict, data_identity: dict, say):
    """(model, params) of the reference run for Collider's excess-loss score, or None."""
    filtering = config.get("collider")
    if not (filtering and filtering.enabled and filtering.score == "excess_loss"):
        return None
    ref_config, ref_state, ref_meta = load_run(filtering.reference)
    if ref_meta["data"]["tokenizer"] != data_identity["tokenizer"]:
        raise ConfigError(f"the reference run in {filtering.reference} used tokenizer "
                          f"{ref_meta['data']['tokenizer']}, this run {data_identity['tokenizer']}"
                          f": excess loss needs the same tokens")
    say(f"collider: excess loss over the reference model in {filtering.reference}")
    return Transformer(model_config.from_run_config(ref_config)), ref_state.params


COUNTERS = ("training/skipped_steps", "training/consecutive_skips")


def _fetch(pending: list[dict]) -> dict[str, np.ndarray]:
    """The per-step metrics gathered since the last log, `[n_steps]` each (one fetch)."""
    stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *pending))
    return {k: np.asarray(v) for k, v in stacked.items()}


def _mean_applied(per_step: dict[str, np.ndarray]) -> dict[str, float]:
    """Each metric averaged over the steps whose update was applied (none: left out), and
    the skip counters as of the last step."""
    applied = per_step["training/skipped"] == 0
    out = {k: float(per_step[k][-1]) for k in COUNTERS}
    if applied.any():
        out.update({k: float(np.mean(v[applied])) for k, v in per_step.items()
                    if k not in COUNTERS and k != "training/skipped"})
    return out


class _SkipWatch:
    """Follows the skipped updates (NaN/inf: train/step.py) in the logged per-step metrics
    and stops the run after `limit` in a row, naming the steps and the non-finite values."""

    def __init__(self, limit: int):
        self.limit = limit
        self.first: tuple[int, dict[str, float]] | None = None  # this streak's first skip

    def check(self, per_step: dict[str, np.ndarray], first_step: int, newest_checkpoint):
        for i, in_a_row in enumerate(per_step["training/consecutive_skips"]):
            step = first_step + i
            if in_a_row == 0:
                continue
            if in_a_row == 1 or self.first is None:  # (None: resumed inside a streak)
                self.first = (step, {k: np.asarray(v[i]).tolist() for k, v in per_step.items()
                                     if not np.isfinite(v[i]).all()})
            if in_a_row >= self.limit:
                at, bad = self.first
                values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items())) or "none left"
                kept = (f"the newest checkpoint, step {newest_checkpoint}, is from before it"
                        if newest_checkpoint is not None else "no checkpoint was saved")
                raise DivergenceError(
                    f"{int(in_a_row)} updates in a row were skipped for NaN/inf values (steps "
                    f"{at}-{step}, training.max_consecutive_skips={self.limit}); at step {at}: "
                    f"{values}. Stopped without saving: {kept}; lower optimizer.lr or set "
                    f"optimizer.grad_clip, then re-run to resume")


def evaluate(eval_step, params, batches: BatchSource, n_batches: int,
             sharding: jax.sharding.Sharding | None = None) -> dict[str, float]:
    """`eval/ce` (nats per target token) and `eval/bpb` (bits per byte of the text targets:
    BOS and other zero-byte targets left out of both sums) over the first n_batches."""
    totals = None
    for i in range(n_batches):
        out = eval_step(params, to_device(batches.batch(i), sharding))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    t = jax.device_get(totals)
    ce_sum, tokens, ce_text, n_bytes = (float(t[k]) for k in ("ce_sum", "tokens", "ce_text",
                                                              "bytes"))
    return {"eval/ce": ce_sum / max(tokens, 1.0),
            "eval/bpb": ce_text / (math.log(2) * max(n_bytes, 1.0))}


def train(config: ml_collections.ConfigDict, workdir: str,
          evaluators: Sequence[Evaluator] = (), hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Train (or resume) the run `config` in `workdir`; returns a summary of the final metrics.
    Every process of a multi-host job runs this; only process 0 prints and writes metrics.

    `evaluators` are the periodic evaluations besides validation loss, built by the caller:
    `experiments.run` passes `nanochat_jax.eval.code.training_evaluators(config)` (the code
    evaluation when `training.code_eval_every` > 0), so train/ depends on neither eval/ nor
    infer/. `hooks` are research code's own actions (train/schedule.py `Hook`), run after
    the loop's own at the steps they are due: `Hook(lambda step, state: ..., every=100)`."""
    if "distributed" in config:
        sharding_lib.initialize_distributed(config.distributed)
    started = time.perf_counter()  # training/wall_s: seconds since the call, start-up in
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)
    mcfg = validate(config)  # every cross-group check, before anything has side effects
    every = config.training.code_eval_every
    if every and "code" not in {e.name for e in evaluators}:
        raise ConfigError(f"training.code_eval_every={every} needs the code evaluator: "
                          f"experiments.run builds it; from Python call train(config, workdir, "
                          f"evaluators=nanochat_jax.eval.code.training_evaluators(config))")
    check_workdir(workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):  # every step is traced for this mesh's devices and shards
        return _train_on(mesh, config, workdir, mcfg, started, say, evaluators, hooks)


def _train_on(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict, workdir: str,
              mcfg: model_config.ModelConfig, started: float, say,
              evaluators: Sequence[Evaluator], hooks: Sequence[Hook]) -> dict[str, Any]:
    """`train` once the mesh is made and set: the data, the setup, the resume point, then
    the steps and the schedule of hooks."""
    checkpoints = os.path.join(workdir, "checkpoints")
    saved = newest_sidecar(checkpoints)
    if saved is not None:
        check_resumable(saved, config, mcfg, workdir)
    os.makedirs(workdir, exist_ok=True)
    data = _Data.open(config, workdir, mcfg, say)
    built = setup(config, mesh, model_config=mcfg, pad_id=data.tokenizer.pad_id,
                  token_bytes=data.tokenizer.token_bytes,
                  reference=_reference(config, data.identity, say))
    say(f"mesh: {', '.join(f'{k}={v}' for k, v in mesh.shape.items())} over "
        f"{jax.device_count()} {jax.devices()[0].platform} devices in {jax.process_count()} "
        f"process(es)")
    run = _Run(config, workdir, built, data, started, say)
    try:
        state = run.resume(built.state)
        if config.training.tune_kernel and mcfg.tunes_kernel:
            tokens = jax.ShapeDtypeStruct((config.data.batch_size, mcfg.seq_len + 1),
                                          jnp.int32)
            tune_kernel_tiles(built.train_step, state, tokens, *built.step_extra, say=say)
        run.describe(state)
        return run.loop(state, run.hooks(evaluators, hooks))
    finally:
        run.close()


@dataclasses.dataclass(frozen=True)
class _Data:
    """The run's corpus opened and verified: its tokenizer, batch sources and identity."""

    tokenizer: Any
    train: BatchSource
    validation: BatchSource
    identity: dict  # tokenizer and corpus hashes, saved in every sidecar

    @classmethod
    def open(cls, config: ml_collections.ConfigDict, workdir: str,
             mcfg: model_config.ModelConfig, say) -> _Data:
        corpus, train_data, val_data = open_data(config, mcfg.seq_len, say)
        tokenizer = corpus.tokenizer
        if jax.process_index() == 0:
            tokenizer.save(workdir)  # the run is usable (chat, eval, export) without its corpus
        say(f"data: {config.data.source} ({corpus.directory}): {train_data.n_rows:,} train "
            f"rows, {val_data.n_rows:,} val rows of {mcfg.seq_len + 1} tokens; "
            f"{tokenizer.name}")
        return cls(tokenizer, train_data, val_data,
                   {"tokenizer": tokenizer.identity(),
                    "corpus_sha256": corpus.manifest["content_sha256"]})


class _Run:
    """One launch of a run: its checkpoints, metrics, progress bar and clock, and the
    actions the schedule of hooks runs (each `action(step, state)`)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, built: Setup,
                 data: _Data, started: float, say):
        self.config, self.workdir, self.built, self.data = config, workdir, built, data
        self.started, self._print = started, say
        self.main_process = jax.process_index() == 0
        self.training = config.training
        self.peak, self.peak_source = metrics_lib.peak_flops_per_chip(self.training.peak_flops)
        self.flops_per_token = metrics_lib.flops_per_token(built.model_config,
                                                           built.model_config.seq_len)
        self.profiler = StepProfiler(parse_steps(self.training.profile_steps,
                                                 self.training.steps), workdir, say=self.say)
        self.writer = self.bar = self.batches = None
        self.tracker_ids: dict = {}  # set with the writer; saved in every sidecar
        self.restored_sidecar: dict = {}
        self.pending: list[dict] = []  # the step metrics since the last log, on device
        self.summary: dict[str, Any] = {"interrupted": False}
        self.skips = _SkipWatch(self.training.max_consecutive_skips)
        self.clock = Clock(config.data.batch_size * built.model_config.seq_len)
        self.stop_reason: str | None = None
        self.signals = _StopFlag((signal.SIGINT,) if jax.process_count() > 1 else
                                 (signal.SIGINT, signal.SIGTERM))
        self.memory = {"memory/params_bytes": tree_bytes(built.state.params),
                       "memory/opt_state_bytes": tree_bytes(built.state.opt_state)}
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.every,
                                 config.checkpoint.max_to_keep)  # last: `close` releases it

    def say(self, text: str) -> None:
        """Print a line (process 0), above the progress bar once there is one."""
        if self.bar is not None and self.main_process:
            self.bar.write(text)
        else:
            self._print(text)

    def resume(self, state):
        """The newest intact checkpoint's state (checked against this run), else `state`."""
        def like_for(saved: dict):
            check_resumable(saved, self.config, self.built.model_config, self.workdir)
            check_same_data(saved, self.data.identity, self.workdir)
            self.restored_sidecar = saved
            return state

        found = self.ckpt.restore_newest(like_for, say=self.say, set_aside=True)
        if found is None:
            return state
        self.say(f"resumed from {self.workdir} at step {found[0]}")
        return found[1]

    def describe(self, state) -> None:
        """Print the model, optimizer and peak FLOP/s; open the metrics writer."""
        mcfg, optimizer = self.built.model_config, self.config.optimizer
        n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
        self.say(f"model: {self.config.model.preset} "
                 f"({'ternary' if mcfg.ternary else 'dense'}), {n_params:,} params; optimizer "
                 f"{optimizer.name}; peak {self.peak / 1e9:,.1f} GFLOP/s per chip "
                 f"({self.peak_source}) x {jax.device_count()}")
        if mcfg.fp4 is not None:
            where = " and ".join(["the dense layers"] * (not mcfg.ternary)
                                 + ["the LM head"] * mcfg.fp4_head)
            self.say(f"FP4 backward ({mcfg.fp4_backward}"
                     f"{', Hadamard' if mcfg.fp4_hadamard else ''}) of {where}, forward exact: "
                     f"simulated on {jax.devices()[0].device_kind} (ternary/fp4.py; native "
                     f"scaled FP4 matmuls need a Blackwell GPU)")
        start = int(state.step)
        sinks = ()
        if self.config.logging.wandb and self.main_process:  # a resumed run's W&B run goes on
            sinks = (trackers.WandbSink(self.config.logging, self.workdir,
                                        self.config.to_dict(), self.restored_sidecar.get(
                                            "trackers", {}).get("wandb_id"), self.say),)
            self.tracker_ids["wandb_id"] = sinks[0].run_id
        self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.main_process,
                                               resume_step=start, sinks=sinks)
        self.summary["start_step"] = start

    def hooks(self, evaluators: Sequence[Evaluator], own: Sequence[Hook]) -> list[Hook]:
        """The schedule: per-step bookkeeping and stop checks, the profiler's stop, logging,
        the evaluations, FIRE, research code's `own` hooks, saving (last but the profiler's
        start, so a checkpoint holds the state after every hook of its step and a resume
        replays none), the profiler's start."""
        training, fire = self.training, self.config.optimizer.fire
        validation = self.evaluation(self.validate, _describe_validation)
        evaluations = [Hook(self.evaluation(e.build(self.built.model, self.data.tokenizer),
                                            e.describe), every=e.every)
                       for e in evaluators if e.every]
        firing = (fire.step is not None and 0 <= fire.step <= training.steps)
        saving = self.config.checkpoint.every > 0
        return [Hook(self.progress, every=1, paused=False),
                Hook(self.check_stop, every=1, paused=False),
                *self.profiler.stop_hooks(),
                Hook(self.log, every=training.log_every),
                Hook(self.first_validation, at=(0,)),
                Hook(validation, every=training.eval_every),
                *evaluations,
                *([Hook(self.fire, at=(fire.step,))] if firing else []),
                *own,
                *([Hook(self.save, every=self.config.checkpoint.every)] if saving else []),
                *self.profiler.start_hooks()]

    def loop(self, state, hooks: Sequence[Hook]) -> dict[str, Any]:
        """The steps from the state's own to `training.steps`, the hooks after each."""
        step, last = int(state.step), self.training.steps
        self.bar = tqdm(total=last, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.main_process)
        self.batches = Prefetcher(self.data.train, step, depth=self.config.data.prefetch,
                                  sharding=self.built.shardings.batch)
        with self.signals:  # until the final save is under way
            state = run_due(hooks, step, last, state, self.clock, starting=True)
            while step < last and self.stop_reason is None and self.signals.signal is None:
                batch_step, batch = next(self.batches)
                assert batch_step == step, (batch_step, step)
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    state, metrics = self.built.train_step(state, batch, *self.built.step_extra)
                step += 1
                self.pending.append(metrics)
                state = run_due(hooks, step, last, state, self.clock)
            self.stop_reason = self.stop_reason or self.signals.signal
            if self.stop_reason is not None:
                self.summary["interrupted"] = True
                self.say(f"{self.stop_reason} received: stopped at step {step}; re-run the "
                         f"same command to resume")
            if self.ckpt.latest_step() != step and not int(state.consecutive_skips):
                self.ckpt.save(step, state, self.meta(step))
        self.summary["step"] = step
        return self.summary

    # The hooks' actions: each (step, state) -> new state or None.

    def progress(self, step: int, state) -> None:
        self.bar.update(1)
        if step == self.summary["start_step"] + 1:  # compilation stays out of throughput
            jax.block_until_ready(state)
            self.clock.restart(step)

    def check_stop(self, step: int, state) -> None:
        if self.ckpt.reached_preemption(step):  # the same answer on every host
            self.stop_reason = "SIGTERM (preemption, agreed by every process)"
        elif self.signals.signal is not None:
            self.stop_reason = self.signals.signal

    def validate(self, params) -> dict[str, float]:
        return evaluate(self.built.eval_step, params, self.data.validation,
                        min(self.training.eval_batches,
                            self.data.validation.n_rows // self.config.data.batch_size),
                        self.built.shardings.batch)

    def first_validation(self, step: int, state) -> None:
        self.writer.write(0, {**self.validate(state.params), **self.memory})

    def log(self, step: int, state) -> None:
        per_step, first = _fetch(self.pending), step - len(self.pending) + 1
        self.pending.clear()
        logged = {**_mean_applied(per_step), "training/epoch": self.data.train.epoch(step),
                  **self.memory, "training/wall_s": time.perf_counter() - self.started,
                  **metrics_lib.device_memory()}
        tokens_per_sec = self.clock.rate(step)
        if tokens_per_sec is not None:
            logged.update({"throughput/tokens_per_sec": tokens_per_sec,
                           "throughput/mfu": metrics_lib.mfu(
                               tokens_per_sec, self.flops_per_token, self.peak,
                               jax.device_count())})
            self.bar.set_postfix(loss=f"{logged.get('loss/total', math.nan):.3f}",
                                 tok_s=f"{tokens_per_sec:,.0f}")
        self.clock.restart(step)
        self.writer.write(step, logged)
        self.summary.update(logged)
        if per_step["training/skipped"].any():
            self.say(f"step {step}: {int(per_step['training/skipped'].sum())} of the last "
                      f"{len(per_step['training/skipped'])} updates skipped (NaN/inf); "
                      f"{int(logged['training/skipped_steps'])} in all")
            self.skips.check(per_step, first, self.ckpt.latest_step())

    def evaluation(self, evaluate_params, describe):
        """A hook action: `evaluate_params(params) -> metrics`, written and described."""
        def action(step: int, state) -> None:
            evaluated = evaluate_params(state.params)
            self.writer.write(step, {**evaluated,
                                     "training/wall_s": time.perf_counter() - self.started})
            self.summary.update(evaluated)
            self.say(f"step {step}: {describe(evaluated)}")
        return action

    def save(self, step: int, state) -> None:  # only states whose last update was applied
        if int(state.consecutive_skips):
            self.say(f"step {step}: checkpoint postponed: the last update was skipped")
        else:
            self.ckpt.save(step, state, self.meta(step))

    def fire(self, step: int, state):
        """FIRE at a data boundary (docs/techniques.md#fire): the hidden matrices
        re-initialised once, their moments reset."""
        iters = self.config.optimizer.fire.iters
        state = jax.jit(functools.partial(apply_fire, iters=iters), donate_argnums=0,
                        out_shardings=self.built.shardings.state)(state)
        self.say(f"step {step}: FIRE re-initialised the hidden matrices ({iters} "
                  f"Newton-Schulz iterations), moments reset")
        return state

    def meta(self, step: int) -> dict:
        return {"config": self.config.to_dict(), "step": step, "trackers": self.tracker_ids,
                "data": {**self.data.identity, "batches_consumed": step,
                         "seed": self.training.seed}}

    def close(self) -> None:
        self.profiler.close()
        for part in (self.batches, self.bar, self.ckpt, self.writer):
            if part is not None:
                part.close()


def _describe_validation(evaluated: dict[str, float]) -> str:
    return f"val ce {evaluated['eval/ce']:.4f}, bpb {evaluated['eval/bpb']:.4f}"
