"""Every check across config groups, in one function run before anything has side effects.

`validate(config)` is what `train` calls first (and `experiments.run` through it): before a
workdir is made, a corpus built, a checkpoint manager started or a step compiled. Each
problem is a `ConfigError` naming the field, the value and the way out. A group's own
checks live where it becomes a type (`ModelConfig.__post_init__`), reached from here.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from nanochat_jax.collider import SCORES
from nanochat_jax.data.tokenizer import BYTE_VOCAB
from nanochat_jax.errors import ConfigError
from nanochat_jax.model import config as model_config
from nanochat_jax.optim.factory import OPTIMIZERS, SCHEDULES
from nanochat_jax.train.profile import parse_steps
from nanochat_jax.train.sharding import mesh_shape
from nanochat_jax.train.step import build_objective, cpu_schedule_flags
from nanochat_jax.train.trackers import check_logging


def _positive(**fields) -> None:
    for name, value in fields.items():
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")


def validate(config: ml_collections.ConfigDict, n_devices: int | None = None
             ) -> model_config.ModelConfig:
    """Refuse a run config that cannot train as asked; -> its ModelConfig. `n_devices`
    (default: every device JAX sees) is what the mesh must cover."""
    mcfg = model_config.from_run_config(config)  # the model group's own checks
    training, data, optimizer = config.training, config.data, config.optimizer
    _positive(**{"training.steps": training.steps, "training.log_every": training.log_every,
                 "training.eval_every": training.eval_every,
                 "training.grad_accum": training.grad_accum,
                 "training.max_consecutive_skips": training.max_consecutive_skips,
                 "data.batch_size": data.batch_size, "optimizer.lr": optimizer.lr,
                 "optimizer.adam_lr": optimizer.adam_lr})
    if optimizer.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {optimizer.weight_decay}")
    if optimizer.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer.name {optimizer.name!r}: choose one of "
                          f"{', '.join(OPTIMIZERS)}")
    if optimizer.schedule not in SCHEDULES:
        raise ConfigError(f"unknown optimizer.schedule {optimizer.schedule!r}: choose one of "
                          f"{', '.join(SCHEDULES)}")
    cpu_schedule_flags(training.cpu_schedule, "")  # refuses an unknown schedule
    parse_steps(training.profile_steps, training.steps)
    check_logging(config.logging)
    if data.vocab_size < BYTE_VOCAB:
        raise ConfigError(f"data.vocab_size={data.vocab_size} is below {BYTE_VOCAB}, the "
                          f"tokenizer's special tokens plus 256 bytes: use {BYTE_VOCAB} for "
                          f"plain bytes, more for BPE merges")
    if mcfg.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                          f"data.vocab_size={data.vocab_size}")
    if training.code_eval_every and jax.process_count() > 1:
        raise ConfigError("training.code_eval_every runs on a single process; in a "
                          "multi-host run set it to 0 and evaluate checkpoints with "
                          "`python -m nanochat_jax.cli.eval --checkpoint=WORKDIR`")
    _check_features(config, mcfg)
    build_objective(config, 0, mcfg)  # the objective's own checks (collider.keep_ratio)
    sizes = mesh_shape(config.mesh, n_devices or jax.device_count())
    rows = sizes["data"] * sizes["fsdp"] * training.grad_accum
    if data.batch_size % rows:
        raise ConfigError(f"data.batch_size={data.batch_size} must be a multiple of mesh.data x "
                          f"mesh.fsdp ({sizes['data'] * sizes['fsdp']}) x training.grad_accum "
                          f"({training.grad_accum})")
    return mcfg


def _check_features(config: ml_collections.ConfigDict, mcfg: model_config.ModelConfig) -> None:
    """An enabled feature whose settings would make it do nothing (or the wrong thing)."""
    mtp, loop, mhc = (config.get(name) for name in ("mtp", "loop", "mhc"))
    if mtp and mtp.enabled and mtp.depth < 1:
        raise ConfigError(f"mtp.enabled=True with mtp.depth={mtp.depth}: predict at least one "
                          f"extra token (depth >= 1) or set mtp.enabled=False")
    if loop and loop.enabled and loop.max_loops < 2:
        raise ConfigError(f"loop.enabled=True with loop.max_loops={loop.max_loops}: LoopLM needs "
                          f"at least 2 loops, or set loop.enabled=False")
    if mhc and mhc.enabled and mhc.streams < 1:
        raise ConfigError(f"mhc.enabled=True with mhc.streams={mhc.streams}: use >= 1 stream "
                          f"(4 in the paper) or set mhc.enabled=False")
    filtering = config.get("collider")
    if not (filtering and filtering.enabled):
        return
    if filtering.score not in SCORES:
        raise ConfigError(f"unknown collider.score {filtering.score!r}: choose one of "
                          f"{', '.join(SCORES)}")
    if filtering.score == "excess_loss" and not filtering.reference:
        raise ConfigError("collider.score=excess_loss needs collider.reference=WORKDIR, the "
                          "workdir of a trained run with the same tokenizer")
    if mcfg.fp4 is not None and not mcfg.ternary:
        raise ConfigError("Collider's filtered backward and an FP4 backward of dense layers do "
                          "not combine (it would silently run in full precision): set "
                          "collider.enabled=False or model.fp4_backward=none")


def check_workdir(workdir: str) -> None:
    """The run directory is a directory, or can become one."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory: name a directory "
                          f"(it is created if missing)")
