"""Config -> optax chain: AdamW, or the hybrid Muon chain, with LR / weight-decay schedules.

Hybrid Muon (SPECS §3) is `optax.contrib.muon` with `muon_weight_dimension_numbers` that
returns None for everything but hidden 2-D matrices, so embeddings, the LM head and norms go
to its AdamW branch. Hyper-parameters are wrapped in `optax.inject_hyperparams`, so schedules
drive both the learning rate and the weight decay (BitNet's stage-2 decay of 0), and the
current values are readable from the optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.transformer import is_block_kernel

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("constant", "linear", "cosine", "bitnet")

Schedule = Callable[[jax.Array], jax.Array]


def muon_labels(params) -> Any:
    """'muon' for hidden matrices, 'adam' for every other leaf (same tree as params)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: "muon" if is_block_kernel(p, x) else "adam", params)


def _muon_dimension_numbers(params):
    """Flax `[in, out]` kernels reduce over axis 0; None sends a leaf to the AdamW branch."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: MuonDimensionNumbers(reduction_axis=0, output_axis=1)
        if is_block_kernel(p, x) else None, params)


def _decay_mask(params):
    """AdamW decays matrices (embedding and head included), never norms or other 1-D leaves."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def lr_schedule(cfg: Mapping[str, Any], total_steps: int) -> tuple[Schedule, Schedule]:
    """(lr multiplier, weight-decay multiplier) as functions of the step, both in [0, 1].

    constant / linear / cosine: linear warmup, then hold / decay to `min_lr_ratio`.
    bitnet (SPECS §1): linear decay whose value is multiplied by `stage2_lr_ratio` from
    step `stage2_at * total_steps` on (the abrupt drop), where weight decay also becomes 0.
    """
    name, warmup = cfg["schedule"], int(cfg["warmup_steps"])
    if name not in SCHEDULES:
        raise ConfigError(f"unknown optimizer.schedule {name!r}: choose one of "
                          f"{', '.join(SCHEDULES)}")
    floor = float(cfg["min_lr_ratio"])
    decay_steps = max(total_steps - warmup, 1)
    warm = optax.linear_schedule(0.0, 1.0, max(warmup, 1)) if warmup else (lambda s: 1.0)
    decay = {
        "constant": optax.constant_schedule(1.0),
        "linear": optax.linear_schedule(1.0, floor, decay_steps),
        "cosine": optax.cosine_decay_schedule(1.0, decay_steps, alpha=floor),
        "bitnet": optax.linear_schedule(1.0, floor, decay_steps),
    }[name]
    lr = optax.join_schedules([warm, decay], [warmup]) if warmup else decay
    if name != "bitnet":
        return lr, optax.constant_schedule(1.0)
    boundary = int(round(float(cfg["stage2_at"]) * total_steps))
    ratio = float(cfg["stage2_lr_ratio"])
    lr_two_stage = lambda s: lr(s) * jnp.where(s < boundary, 1.0, ratio)
    wd_two_stage = lambda s: jnp.where(s < boundary, 1.0, 0.0)
    return lr_two_stage, wd_two_stage


def build_optimizer(cfg: Mapping[str, Any], total_steps: int
                    ) -> tuple[optax.GradientTransformation, Schedule]:
    """The optax chain for `cfg` (the run config's `optimizer` group) and its LR schedule.

    The chain is `clip_by_global_norm -> optimizer`; the returned schedule gives the
    primary learning rate (Muon's for `muon`, AdamW's for `adamw`) for logging.
    """
    name = cfg["name"]
    lr_factor, wd_factor = lr_schedule(cfg, total_steps)
    lr = lambda s: cfg["lr"] * lr_factor(s)
    wd = lambda s: cfg["weight_decay"] * wd_factor(s)
    if name == "adamw":
        tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=lr, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
            weight_decay=wd, mask=_decay_mask)
    elif name == "muon":
        adam_lr = lambda s: cfg["adam_lr"] * lr_factor(s)
        tx = optax.inject_hyperparams(
            optax.contrib.muon,
            static_args=("ns_steps", "muon_weight_dimension_numbers", "consistent_rms"))(
            learning_rate=lr, beta=cfg["momentum"], ns_steps=int(cfg["ns_steps"]),
            eps=cfg["eps"], weight_decay=wd, adam_learning_rate=adam_lr,
            adam_b1=cfg["b1"], adam_b2=cfg["b2"], adam_weight_decay=0.0,
            muon_weight_dimension_numbers=_muon_dimension_numbers,
            consistent_rms=cfg["consistent_rms"])
    else:
        raise ConfigError(f"unknown optimizer.name {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg["grad_clip"]:
        tx = optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]), tx)
    return tx, lr
