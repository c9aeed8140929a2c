"""The experiment runner loop: data -> jitted train_step -> metrics / eval / checkpoints.

`train(config, workdir)` runs or resumes the job described by a run config (see
`experiments/configs/base.py`). Re-running with the same workdir resumes from the latest
checkpoint and reproduces the uninterrupted loss curve: batches are a function of the step
and the RNG lives in the saved state. SIGINT / SIGTERM (Ctrl-C, pod preemption) stop after
the current step with a checkpoint; after a SIGKILL the newest complete, intact checkpoint
is the resume point (train/checkpoint.py). Steps with NaN/inf values are skipped on device;
`training.max_consecutive_skips` in a row stop the run (BUILD.md "Faults").
"""

from __future__ import annotations

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
from nanochat_jax.optim.factory import build_optimizer
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
from nanochat_jax.train.schedule import Clock, Evaluator, Periodic
from nanochat_jax.train.state import init_train_state
from nanochat_jax.train.step import (
    StepShardings,
    build_objective,
    make_eval_step,
    make_train_step,
    tune_kernel_tiles,
)
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


def _load_reference(workdir: str, data_identity: dict):
    """(model, params) of the reference run for Collider's excess-loss score."""
    ref_config, ref_state, ref_meta = load_run(workdir)
    if ref_meta["data"]["tokenizer"] != data_identity["tokenizer"]:
        raise ConfigError(f"the reference run in {workdir} used tokenizer "
                          f"{ref_meta['data']['tokenizer']}, this run {data_identity['tokenizer']}"
                          f": excess loss needs the same tokens")
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
          evaluators: Sequence[Evaluator] = ()) -> dict[str, Any]:
    """Train (or resume) the run `config` in `workdir`; returns a summary of the final metrics.
    Every process of a multi-host job runs this; only process 0 prints and writes metrics.

    `evaluators` are the periodic evaluations besides validation loss, built by the caller:
    `experiments.run` passes `nanochat_jax.eval.code.training_evaluators(config)` (the code
    evaluation when `training.code_eval_every` > 0), so train/ depends on neither eval/ nor
    infer/."""
    if "distributed" in config:
        sharding_lib.initialize_distributed(config.distributed)
    started = time.perf_counter()  # training/wall_s: seconds since the call, start-up in
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *_, **__: None)
    mcfg = validate(config)  # every cross-group check, before anything has side effects
    every = config.training.code_eval_every
    if every and "code" not in {e.name for e in evaluators}:
        raise ConfigError(f"training.code_eval_every={every} needs the code evaluator: "
                          f"experiments.run builds it; from Python call train(config, workdir, "
                          f"evaluators=nanochat_jax.eval.code.training_evaluators(config))")
    check_workdir(workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh):  # every step is traced for this mesh's devices and shards
        return _train_on(mesh, config, workdir, mcfg, started, say, evaluators)


def _train_on(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict, workdir: str,
              mcfg: model_config.ModelConfig, started: float, say,
              evaluators: Sequence[Evaluator]) -> dict[str, Any]:
    """`train` once the mesh is made and set."""
    main_process = jax.process_index() == 0
    training, data = config.training, config.data
    filtering = config.get("collider")
    checkpoints = os.path.join(workdir, "checkpoints")
    saved = newest_sidecar(checkpoints)
    if saved is not None:
        check_resumable(saved, config, mcfg, workdir)
    os.makedirs(workdir, exist_ok=True)

    corpus, train_data, val_data = open_data(config, mcfg.seq_len, say)
    tokenizer = corpus.tokenizer
    if main_process:
        tokenizer.save(workdir)  # the run is usable (chat, eval, export) without its corpus
    data_identity = {"tokenizer": tokenizer.identity(),
                     "corpus_sha256": corpus.manifest["content_sha256"]}
    eval_batches = min(training.eval_batches, val_data.n_rows // data.batch_size)
    say(f"data: {data.source} ({corpus.directory}): {train_data.n_rows:,} train rows, "
        f"{val_data.n_rows:,} val rows of {mcfg.seq_len + 1} tokens; {tokenizer.name}")

    model = Transformer(mcfg)
    tx, lr_fn = build_optimizer(config.optimizer, training.steps)
    state = init_train_state(model, tx, training.seed, mcfg.seq_len, mesh)
    say(f"mesh: {', '.join(f'{k}={v}' for k, v in mesh.shape.items())} over "
        f"{jax.device_count()} {jax.devices()[0].platform} devices in {jax.process_count()} "
        f"process(es)")
    ckpt = Checkpointer(checkpoints, config.checkpoint.every, config.checkpoint.max_to_keep)

    restored_sidecar: dict = {}

    def like_for(saved: dict):
        check_resumable(saved, config, mcfg, workdir)
        check_same_data(saved, data_identity, workdir)
        restored_sidecar.clear()
        restored_sidecar.update(saved)
        return state

    found = ckpt.restore_newest(like_for, say=say, set_aside=True)
    if found is not None:
        state = found[1]
        say(f"resumed from {workdir} at step {found[0]}")
    tracker_ids: dict = {}  # set with the writer below; saved in every sidecar

    def meta(step: int) -> dict:
        return {"config": config.to_dict(), "step": step, "trackers": tracker_ids,
                "data": {**data_identity, "batches_consumed": step, "seed": training.seed}}

    optimizer = config.optimizer
    fire = jax.jit(functools.partial(apply_fire, iters=optimizer.fire.iters), donate_argnums=0,
                   out_shardings=jax.tree.map(lambda x: x.sharding, state))
    reference, reference_params = None, None
    if filtering and filtering.enabled and filtering.score == "excess_loss":
        reference, reference_params = _load_reference(filtering.reference, data_identity)
        reference_params = jax.device_put(reference_params, sharding_lib.named(
            sharding_lib.param_specs(reference_params, mesh), mesh))
        say(f"collider: excess loss over the reference model in {filtering.reference}")
    shardings = StepShardings.on(mesh, state, reference_params)
    train_step = make_train_step(model, tx, lr_fn, build_objective(config, tokenizer.pad_id),
                                 reference, grad_accum=training.grad_accum, shardings=shardings)
    step_extra = () if reference is None else (reference_params,)
    if training.tune_kernel and mcfg.uses_kernel:
        tokens = jax.ShapeDtypeStruct((data.batch_size, mcfg.seq_len + 1), jnp.int32)
        tune_kernel_tiles(train_step, state, tokens, *step_extra, say=say)
    eval_step = make_eval_step(model, jnp.asarray(tokenizer.token_bytes),
                               pad_id=tokenizer.pad_id, vocab_chunk=training.vocab_chunk,
                               shardings=shardings)
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    peak, peak_source = metrics_lib.peak_flops_per_chip(training.peak_flops)
    flops_per_token = metrics_lib.flops_per_token(mcfg, mcfg.seq_len)
    memory = {"memory/params_bytes": tree_bytes(state.params),
              "memory/opt_state_bytes": tree_bytes(state.opt_state)}
    say(f"model: {config.model.preset} ({'ternary' if mcfg.ternary else 'dense'}), "
        f"{n_params:,} params; optimizer {optimizer.name}; "
        f"peak {peak / 1e9:,.1f} GFLOP/s per chip ({peak_source}) x {jax.device_count()}")
    if mcfg.fp4 is not None:
        where = " and ".join(["the dense layers"] * (not mcfg.ternary)
                             + ["the LM head"] * mcfg.fp4_head)
        say(f"FP4 backward ({mcfg.fp4_backward}{', Hadamard' if mcfg.fp4_hadamard else ''}) of "
            f"{where}, forward exact: simulated on {jax.devices()[0].device_kind} "
            f"(ternary/fp4.py; native scaled FP4 matmuls need a Blackwell GPU)")

    start = int(state.step)
    sinks = ()
    if config.logging.wandb and main_process:  # the resumed run's W&B run continues
        sinks = (trackers.WandbSink(config.logging, workdir, config.to_dict(),
                                    restored_sidecar.get("trackers", {}).get("wandb_id"), say),)
        tracker_ids["wandb_id"] = sinks[0].run_id
    writer = metrics_lib.MetricWriter(workdir, enabled=main_process, resume_step=start,
                                      sinks=sinks)
    skips = _SkipWatch(training.max_consecutive_skips)
    summary: dict[str, Any] = {"start_step": start, "interrupted": False}
    validation = functools.partial(evaluate, eval_step, batches=val_data,
                                   n_batches=eval_batches, sharding=shardings.batch)
    if start == 0:
        writer.write(0, {**validation(state.params), **memory})
    clock = Clock(data.batch_size * mcfg.seq_len)
    bar = tqdm(total=training.steps, initial=start, desc="train", unit="step",
               dynamic_ncols=True, disable=not main_process)
    note = bar.write if main_process else say  # tqdm.write prints even when disabled
    pending: list[dict] = []  # the step metrics since the last log, on device

    def log(step: int, state) -> None:
        per_step, first = _fetch(pending), step - len(pending) + 1
        pending.clear()
        logged = {**_mean_applied(per_step), "training/epoch": train_data.epoch(step), **memory,
                  "training/wall_s": time.perf_counter() - started,
                  **metrics_lib.device_memory()}
        tokens_per_sec = clock.rate(step)
        if tokens_per_sec is not None:
            logged.update({"throughput/tokens_per_sec": tokens_per_sec,
                           "throughput/mfu": metrics_lib.mfu(
                               tokens_per_sec, flops_per_token, peak, jax.device_count())})
            bar.set_postfix(loss=f"{logged.get('loss/total', math.nan):.3f}",
                            tok_s=f"{tokens_per_sec:,.0f}")
        clock.restart(step)
        writer.write(step, logged)
        summary.update(logged)
        if per_step["training/skipped"].any():
            note(f"step {step}: {int(per_step['training/skipped'].sum())} of the last "
                 f"{len(per_step['training/skipped'])} updates skipped (NaN/inf); "
                 f"{int(logged['training/skipped_steps'])} in all")
            skips.check(per_step, first, ckpt.latest_step())

    def run_evaluation(evaluation, describe):
        def action(step: int, state) -> None:
            evaluated = evaluation(state.params)
            writer.write(step, {**evaluated, "training/wall_s": time.perf_counter() - started})
            summary.update(evaluated)
            note(f"step {step}: {describe(evaluated)}")
        return action

    def save(step: int, state) -> None:  # only states whose last update was applied
        if int(state.consecutive_skips):
            note(f"step {step}: checkpoint postponed: the last update was skipped")
        else:
            ckpt.save(step, state, meta(step))

    schedule = [Periodic(training.log_every, log),
                Periodic(training.eval_every, run_evaluation(validation, _describe_validation)),
                *[Periodic(e.every, run_evaluation(e.build(model, tokenizer), e.describe))
                  for e in evaluators],
                Periodic(config.checkpoint.every, save)]
    profiler = StepProfiler(parse_steps(training.profile_steps, training.steps), workdir,
                            say=note)
    step = start
    batches = Prefetcher(train_data, start, depth=data.prefetch, sharding=shardings.batch)
    try:
        preempted = False  # every process agreed to stop (multi-process SIGTERM)
        signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGINT,
                                                                    signal.SIGTERM)
        with _StopFlag(signals) as stop:
            while step < training.steps and stop.signal is None and not preempted:
                batch_step, batch = next(batches)
                assert batch_step == step, (batch_step, step)
                if step == optimizer.fire.step:  # a data boundary: re-initialise once (SPECS §7)
                    state = fire(state)
                    note(f"step {step}: FIRE re-initialised the hidden matrices "
                         f"({optimizer.fire.iters} Newton-Schulz iterations), moments reset")
                with profiler.annotate(step + 1):
                    state, step_metrics = train_step(state, batch, *step_extra)
                profiler.after(step + 1, (state, step_metrics))
                step += 1
                preempted = ckpt.reached_preemption(step)  # the same answer on every host
                pending.append(step_metrics)
                bar.update(1)
                if step == start + 1:  # keep compilation out of the throughput numbers
                    jax.block_until_ready(step_metrics)
                    clock.restart(step)
                for periodic in schedule:
                    if periodic.due(step, training.steps):
                        with clock.paused(state):
                            periodic.action(step, state)
            if stop.signal is not None or preempted:
                summary["interrupted"] = True
                why = (stop.signal if stop.signal is not None
                       else "SIGTERM (preemption, agreed by every process)")
                note(f"{why} received: stopped at step {step}; re-run the same command to "
                     f"resume")
            if ckpt.latest_step() != step and not int(state.consecutive_skips):
                ckpt.save(step, state, meta(step))
    finally:
        profiler.close()
        batches.close()
        bar.close()
        ckpt.close()
        writer.close()
    summary["step"] = step
    return summary


def _describe_validation(evaluated: dict[str, float]) -> str:
    return f"val ce {evaluated['eval/ce']:.4f}, bpb {evaluated['eval/bpb']:.4f}"
