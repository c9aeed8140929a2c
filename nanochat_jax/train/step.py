"""Pure train and eval steps, each jit-compiled once.

Batches are `tokens: [B, T+1]` int32; inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]`,
and PAD targets are masked out of the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from nanochat_jax.collider import Carrier
from nanochat_jax.errors import ConfigError
from nanochat_jax.losses import Objective, chunked_cross_entropy, lm_objective
from nanochat_jax.model import config as model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary import kernel, tile_cache, tuning
from nanochat_jax.train import sharding
from nanochat_jax.train.state import TrainState

Metrics = dict[str, jax.Array]
# Step metrics that must be finite for the update to be applied (every loss term adds into
# loss/total, so a NaN/inf in any of them shows there).
GUARDED = ("loss/total", "training/grad_norm", "training/update_norm")


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """In/out shardings of the jitted steps (see train/sharding.py)."""

    state: Any  # TrainState of NamedShardings
    batch: jax.sharding.Sharding  # tokens [B, T+1]
    reference: Any  # the Collider reference's params (or None)
    replicated: jax.sharding.Sharding  # metrics

    @classmethod
    def on(cls, mesh: jax.sharding.Mesh, state: TrainState, reference_params=None):
        """The shardings of a state (and reference params) already placed on `mesh`."""
        def shardings_of(tree):
            return jax.tree.map(lambda x: x.sharding, tree)

        return cls(state=shardings_of(state), batch=sharding.batch_sharding(mesh),
                   reference=shardings_of(reference_params),
                   replicated=sharding.replicated(mesh))


def _split(tokens: jax.Array, pad_id: int):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T] each
    return inputs, targets, targets != pad_id


def build_objective(config, pad_id: int, mcfg: model_config.ModelConfig) -> Objective:
    """The Objective of a run config whose ModelConfig is `mcfg`: z-loss, FP4 of the head's
    backward, and the MTP weight and LoopLM entropy weight as two-stage schedules (value,
    then value_final from `switch_at` x steps on)."""
    steps = config.training.steps

    def two_stage(value: float, final: float, switch_at: float) -> Callable:
        return optax.join_schedules(
            [optax.constant_schedule(value), optax.constant_schedule(final)],
            [int(switch_at * steps)])

    mtp, loop, filtering = config.get("mtp"), config.get("loop"), config.get("collider")
    keep_ratio, sparse_backward = None, True
    if filtering and filtering.enabled:
        if not 0.0 < filtering.keep_ratio <= 1.0:
            raise ConfigError(f"collider.keep_ratio must be in (0, 1], got "
                              f"{filtering.keep_ratio}")
        keep_ratio, sparse_backward = filtering.keep_ratio, filtering.sparse_backward
    return Objective(
        pad_id=pad_id, vocab_chunk=config.training.vocab_chunk, z_loss=config.training.z_loss,
        keep_ratio=keep_ratio, sparse_backward=sparse_backward,
        fp4=mcfg.fp4_head_backward,
        **({"mtp_weight": two_stage(mtp.weight, mtp.weight_final, mtp.switch_at)}
           if mtp and mtp.enabled else {}),
        **({"loop_entropy": two_stage(loop.entropy, loop.entropy_final, loop.switch_at)}
           if loop and loop.enabled else {}))


def reference_token_loss(reference: Transformer, params, inputs: jax.Array,
                         targets: jax.Array, vocab_chunk: int) -> jax.Array:
    """Per-token CE [B, T] of a frozen reference model (Collider's excess-loss score)."""
    hidden, head = reference.apply({"params": params}, inputs,
                                   method=Transformer.hidden_and_head)
    out = chunked_cross_entropy(hidden, head, targets, chunk_size=vocab_chunk)
    return jax.lax.stop_gradient(out.token_ce)


def grads_and_metrics(params, tokens: jax.Array, step: jax.Array, reference_params,
                      key: jax.Array, *, model: Transformer, objective: Objective,
                      reference: Transformer | None = None) -> tuple[Metrics, Any]:
    """tokens [B, T+1] -> (metrics, gradients of the objective w.r.t. params). With Collider
    on, the backward of every BitLinear runs on the kept positions only."""
    inputs, targets, mask = _split(tokens, objective.pad_id)
    carrier = (Carrier.start(inputs.shape, objective.keep_ratio)
               if objective.keep_ratio is not None and objective.sparse_backward else None)
    ref_loss = (None if reference is None else reference_token_loss(
        reference, reference_params, inputs, targets, objective.vocab_chunk))

    def loss_fn(params):
        out = model.apply({"params": params}, inputs, carrier=carrier,
                          method=Transformer.forward, rngs={"fp4": key})
        loss, metrics, _ = lm_objective(out, targets, mask, objective, step, ref_loss,
                                        jax.random.fold_in(key, 2**31 - 1))  # the head
        return loss, metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads


def accumulated(compute: Callable, params, tokens: jax.Array, step: jax.Array,
                reference_params, key: jax.Array, *, grad_accum: int):
    """`compute` (grads_and_metrics) averaged over `grad_accum` micro-batches of tokens
    [B, T+1], one at a time in memory (a `lax.scan`)."""
    b = tokens.shape[0]
    if b % grad_accum:
        raise ConfigError(f"training.grad_accum={grad_accum} does not divide the batch of "
                          f"{b} rows")
    micro = tokens.reshape(b // grad_accum, grad_accum, -1).swapaxes(0, 1)  # [k, B/k, T+1]

    def add(total, xs):
        batch, i = xs
        out = compute(params, batch, step, reference_params, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, out), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
        compute, params, micro[0], step, reference_params, key))
    total, _ = jax.lax.scan(add, zeros, (micro, jnp.arange(grad_accum)))
    return jax.tree.map(lambda x: x / grad_accum, total)


def train_step(state: TrainState, tokens: jax.Array, reference_params=None, *,
               model: Transformer, tx: optax.GradientTransformation, lr_fn: Callable,
               objective: Objective, reference: Transformer | None = None,
               grad_accum: int = 1) -> tuple[TrainState, Metrics]:
    """state, tokens [B, T+1] (, reference params) -> (new state, metrics).

    `reference` (with its params as the third argument) makes Collider's score the excess
    loss over that model; `grad_accum` k > 1 averages the gradients and metrics of k
    micro-batches before the one update. A step whose loss, gradient norm or update norm
    is NaN/inf applies no update and counts itself in `state.skipped_steps` /
    `state.consecutive_skips` (`GUARDED`). Jit it once with `make_train_step`."""
    compute = functools.partial(grads_and_metrics, model=model, objective=objective,
                                reference=reference)
    if grad_accum > 1:
        compute = functools.partial(accumulated, compute, grad_accum=grad_accum)
    key = jax.random.fold_in(state.rng, state.step)  # FP4 stochastic rounding
    metrics, grads = compute(state.params, tokens, state.step, reference_params, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update({"training/lr": jnp.asarray(lr_fn(state.step), jnp.float32),
                    "training/grad_norm": optax.tree.norm(grads),
                    "training/update_norm": optax.tree.norm(updates)})
    # A NaN/inf anywhere skips the update on device (params and moments keep their values;
    # the step, the data position and the optimizers' own step counts advance); the host
    # reads the counters only when it logs.
    finite = jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in GUARDED]))

    def keep(new, old):
        return jax.tree.map(functools.partial(_keep_unless, finite), new, old)

    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    in_a_row = jnp.where(finite, 0, state.consecutive_skips + 1)
    metrics.update({"training/skipped": (~finite).astype(jnp.float32),
                    "training/skipped_steps": skipped.astype(jnp.float32),
                    "training/consecutive_skips": in_a_row.astype(jnp.float32)})
    return state.replace(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         skipped_steps=skipped, consecutive_skips=in_a_row), metrics


def _keep_unless(finite: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """One leaf after a step: `new` when the step was finite; else `old`, except for scalar
    integer leaves: the optimizers' step counts (optax's `count`, which drives schedules,
    Adam's bias correction, GaLore's refresh) advance with `state.step` either way, so
    after k skipped steps no schedule runs k steps behind and `training/lr` is the rate
    applied. (int8 moment codes are arrays, kept like the rest.)"""
    if new.ndim == 0 and jnp.issubdtype(new.dtype, jnp.integer):
        return new
    return jnp.where(finite, new, old)


CPU_SCHEDULES = ("memory", "concurrency")
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def cpu_schedule_flags(cpu_schedule: str, xla_flags: str) -> str:
    """`XLA_FLAGS` with the CPU scheduler `cpu_schedule` asks for: "memory" turns off
    XLA:CPU's concurrency-optimized scheduler (its default), which overlaps independent ops
    by keeping many more buffers live (BUILD.md#architecture-features-mtp-looplm-mhc: e3_full's
    peak RSS 5.5 -> 4.2 GB, tiny_rust's 1.4 -> 1.1 GB, same speed). A scheduler already
    named in `xla_flags` is kept. XLA reads the flag when its CPU backend starts, so the
    commands set it first thing (`jax.jit(compiler_options=...)` accepts the option but
    XLA:CPU does not apply it: measured, same temporaries); other backends ignore it."""
    if cpu_schedule not in CPU_SCHEDULES:
        raise ConfigError(f"unknown training.cpu_schedule {cpu_schedule!r}: choose one of "
                          f"{', '.join(CPU_SCHEDULES)}")
    if CPU_SCHEDULER_FLAG in xla_flags:
        return xla_flags
    flag = f"{CPU_SCHEDULER_FLAG}={str(cpu_schedule == 'concurrency').lower()}"
    return f"{xla_flags} {flag}".strip()


def make_train_step(model: Transformer, tx: optax.GradientTransformation,
                    lr_fn: Callable, objective: Objective, reference: Transformer | None = None,
                    *, grad_accum: int = 1, shardings: StepShardings | None = None):
    """`train_step` with these settings, jitted once, the state buffers donated: call it as
    `step(state, tokens)`, or `step(state, tokens, reference_params)` when `reference` is
    given; `step.lower(...)` compiles it ahead of time. `shardings` fix the in/out
    shardings (train/sharding.py); trace it under `jax.set_mesh(mesh)` so the ternary
    kernel runs per shard (ternary/linear.py)."""
    step = functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn, objective=objective,
                             reference=reference, grad_accum=grad_accum)
    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    s = shardings
    in_shardings = (s.state, s.batch) + ((s.reference,) if reference is not None else ())
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(s.state, s.replicated),
                   donate_argnums=0)


def tune_kernel_tiles(step, *args, cache_path: str | None = None,
                      say: Callable[[str], None] = print) -> dict:
    """Time the Pallas kernel's tilings for every product `step(*args)` runs, on concrete
    arrays, before the step is compiled (`tile_cache.lookups_in` traces it abstractly; `args`
    may be `jax.ShapeDtypeStruct`s), then tune the shapes the trace found no cached tiling
    for (ternary/tuning.py; cache `cache_path`, default `tile_cache.tune_cache_path()`). Does
    nothing where the kernel is not compiled (CPU). -> {cache key: tiling}.

    In a multi-process job every process must compile the same program, and each host's
    cache file may hold different tiles (only process 0 tunes): process 0 tunes what it
    lacks and every process adopts process 0's tiling for every product of the step, by
    one broadcast that all processes join whatever their own caches hold."""
    if kernel.resolve_impl("auto") != "pallas":
        return {}
    keys, pending = tile_cache.lookups_in(step, *args)  # `keys`: the same list everywhere
    lead = jax.process_index() == 0
    if pending and lead:
        say(f"kernel: tuning the tiles of {len(pending)} shapes (cached in "
            f"{cache_path or tile_cache.tune_cache_path()})")
        done = tuning.tune_pending(keys=pending, cache_path=cache_path, say=say)
    else:
        done = {}
    if jax.process_count() == 1 or not keys:
        return done
    width = len(kernel.Blocks._fields)
    tiles = np.asarray([(tile_cache.tuned(k) or (0,) * width) if lead else (0,) * width
                        for k in keys], np.int32)  # [products, 6]
    tiles = multihost_utils.broadcast_one_to_all(tiles)
    chosen = {k: kernel.Blocks(*(int(b) for b in t)) for k, t in zip(keys, tiles, strict=True)
              if t.all()}  # zeros: process 0 has no tiling either, all keep the same default
    tile_cache.adopt(chosen)
    return chosen


def eval_step(params, tokens: jax.Array, *, model: Transformer, token_bytes: jax.Array,
              pad_id: int, vocab_chunk: int) -> Metrics:
    """params, tokens [B, T+1] -> summed CE (nats) and count of the targets, and the same
    CE summed over the targets that are text (one byte or more) with their byte count.

    Sums (not means) so batches combine exactly. CE per token counts every target; bits/byte
    = ce_text / (ln 2 * bytes) leaves out the targets that stand for no bytes (BOS, the
    other special tokens), so numerator and denominator count the same tokens.
    """
    inputs, targets, mask = _split(tokens, pad_id)
    hidden, head = model.apply({"params": params}, inputs, method=Transformer.hidden_and_head)
    out = chunked_cross_entropy(hidden, head, targets, mask, chunk_size=vocab_chunk)
    n_bytes = jnp.where(mask, token_bytes[targets], 0)  # [B, T]
    return {"ce_sum": jnp.sum(out.token_ce), "tokens": jnp.sum(mask),
            "ce_text": jnp.sum(jnp.where(n_bytes > 0, out.token_ce, 0.0)),
            "bytes": jnp.sum(n_bytes)}


def make_eval_step(model: Transformer, token_bytes: jax.Array, *, pad_id: int,
                   vocab_chunk: int, shardings: StepShardings | None = None):
    """`eval_step` with these settings, jitted once: `step(params, tokens)`."""
    step = functools.partial(eval_step, model=model, token_bytes=token_bytes, pad_id=pad_id,
                             vocab_chunk=vocab_chunk)
    if shardings is None:
        return jax.jit(step)
    s = shardings
    return jax.jit(step, in_shardings=(s.state.params, s.batch), out_shardings=s.replicated)
