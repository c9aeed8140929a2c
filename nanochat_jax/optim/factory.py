"""Config -> optax chain: the optimizer compositions, with LR / weight-decay schedules.

`optimizer.name` picks the composition from `BUILDERS`; each reads the sub-groups of the
`optimizer` group it uses (`adamw`, `lion`, `muon`, `int8`, `galore`) and the shared fields
(`lr`, `adam_lr`, `weight_decay`, `grad_clip`, the schedule). Hidden matrices (the BitLinear
kernels, model/params.py `is_hidden`) and everything else (embedding, LM head, norms) form
two groups:

| name | hidden matrices | other leaves |
|---|---|---|
| adamw | AdamW (lr) | AdamW (lr) |
| lion | Lion (lr), masked decay | Lion (lr) |
| muon | Muon (lr), `optax.contrib.muon` | AdamW (adam_lr) |
| muon_8bit | as muon, momentum >= int8.min_size stored as blockwise int8 | AdamW (fp32) |
| galore2 | GaLore 2 (rank-r Adam, lr, scale galore.scale) | AdamW (adam_lr) |
| galore2_muon_8bit | GaLore 2 with an 8-bit Muon inner (lr), Muon's RMS | AdamW (adam_lr) |

Weight decay is one convention in every arm: every weight matrix (embedding and head
included; not norms, biases or mHC's `b_res`: model/params.py `is_decayed`) decays by
`weight_decay` times its group's learning rate, on the same schedule.

`galore2_muon_8bit` gives its back-projected Muon update Muon's own shape factor
(`_muon_shape_scale`, on the full matrix) and rescales the rank-r update to
full-rank Muon's RMS (galore `scale="rank"`), so at Muon's lr it steps like the `muon` arm;
`galore.scale` is GaLore-Adam's (`galore2`).

Hyper-parameters are wrapped in `optax.inject_hyperparams`, so schedules drive both the
learning rate and the weight decay (BitNet's stage-2 decay of 0) and the current values are
readable from the optimizer state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.params import is_decayed, is_hidden
from nanochat_jax.optim.galore import galore
from nanochat_jax.optim.quantized import quantize_states

SCHEDULES = ("constant", "linear", "cosine", "bitnet")

Schedule = Callable[[jax.Array], jax.Array]


def matrix_labels(params) -> Any:
    """'matrix' for hidden matrices (model/params.py `is_hidden`), 'other' for every other
    leaf: the two groups. A parameter model/params.py does not declare is refused."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: "matrix" if is_hidden(p, x) else "other", params)


def _decay_mask(params):
    """AdamW decays weight matrices (embedding and head included), never norms' scales,
    biases or mHC's small maps (model/params.py `is_decayed`)."""
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def lr_schedule(cfg: Mapping[str, Any], total_steps: int) -> tuple[Schedule, Schedule]:
    """(lr multiplier, weight-decay multiplier) as functions of the step, both in [0, 1].

    constant / linear / cosine: linear warmup, then hold / decay to `min_lr_ratio`.
    bitnet (docs/techniques.md#bitnet): linear decay, multiplied by `stage2_lr_ratio` from
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

    def lr_two_stage(s):
        return lr(s) * jnp.where(s < boundary, 1.0, ratio)

    def wd_two_stage(s):
        return jnp.where(s < boundary, 1.0, 0.0)

    return lr_two_stage, wd_two_stage


def _every_matrix(tree):
    """Muon dimension numbers for every leaf of a tree of `[..., in, out]` matrices (optax
    0.2.8's default, None, fails on a plain dict): leading axes (the layers of a
    `model.scan_layers` stack) are batch axes, each matrix orthogonalised on its own."""
    return jax.tree.map(lambda _: MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
                        tree)


def _muon_shape_scale(consistent_rms: float | None) -> optax.GradientTransformation:
    """What `optax.contrib.muon` multiplies its orthogonalised `[in, out]` updates by:
    sqrt(max(1, fan_out / fan_in)), or sqrt(max(fan_in, fan_out)) * consistent_rms
    (Moonlight). optax 0.2.8 keeps its own `scale_by_shape` private, hence this copy."""

    def scale(u):  # [..., in, out]
        fan_in, fan_out = u.shape[-2:]
        factor = (max(fan_in, fan_out) ** 0.5 * consistent_rms if consistent_rms is not None
                  else max(1.0, fan_out / fan_in) ** 0.5)
        return factor * u

    return optax.stateless(lambda updates, params: jax.tree.map(scale, updates))


class Rates(NamedTuple):
    """The run's schedules, each a function of the step: `lr` (the hidden matrices' rate;
    every leaf's for adamw / lion), `adam_lr` (the AdamW group of the hybrid arms) and `wd`
    (the weight decay)."""

    lr: Schedule
    adam_lr: Schedule
    wd: Schedule


def _adamw_at(cfg, learning_rate: Schedule, rates: Rates) -> optax.GradientTransformation:
    """AdamW (`optimizer.adamw`) at `learning_rate`, with the weight decay every arm applies
    (module doc)."""
    adamw = cfg["adamw"]
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate, b1=adamw["b1"], b2=adamw["b2"], eps=adamw["eps"],
        weight_decay=rates.wd, mask=_decay_mask)


def _adamw(cfg, rates: Rates) -> optax.GradientTransformation:
    """AdamW on every leaf at lr."""
    return _adamw_at(cfg, rates.lr, rates)


def _lion(cfg, rates: Rates) -> optax.GradientTransformation:
    """Lion on every leaf with its own betas (`optimizer.lion`)."""
    lion = cfg["lion"]
    return optax.inject_hyperparams(optax.lion, static_args=("mask",))(
        learning_rate=rates.lr, b1=lion["b1"], b2=lion["b2"], weight_decay=rates.wd,
        mask=_decay_mask)


def _hybrid_muon(cfg, rates: Rates, *, quantize: bool) -> optax.GradientTransformation:
    """Muon (`optax.contrib.muon`, `optimizer.muon`) on the hidden matrices, optionally
    with 8-bit states (`optimizer.int8`); AdamW (adam_lr) on the embedding, head and norms,
    whose states stay fp32: linear int8 codes zero Adam's small second moments and blow up
    the update."""
    muon = cfg["muon"]
    matrices = optax.inject_hyperparams(
        optax.contrib.muon,
        static_args=("ns_steps", "muon_weight_dimension_numbers", "consistent_rms"))(
        learning_rate=rates.lr, beta=muon["momentum"], ns_steps=int(muon["ns_steps"]),
        eps=muon["eps"], weight_decay=rates.wd, muon_weight_dimension_numbers=_every_matrix,
        consistent_rms=muon["consistent_rms"])
    if quantize:
        matrices = _quantized(cfg, matrices)
    return optax.partition({"matrix": matrices, "other": _other_adamw(cfg, rates)},
                           matrix_labels)


def _other_adamw(cfg, rates: Rates) -> optax.GradientTransformation:
    """AdamW at adam_lr on the leaves that are not hidden matrices (embedding, head, norms)."""
    return _adamw_at(cfg, rates.adam_lr, rates)


def _quantized(cfg, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with its states stored as blockwise int8 (`optimizer.int8`)."""
    int8 = cfg["int8"]
    return quantize_states(inner, block_size=int(int8["block_size"]),
                           min_size=int(int8["min_size"]))


def _galore_matrices(learning_rate, weight_decay, *, inner, cfg, muon: bool
                     ) -> optax.GradientTransformation:
    """GaLore 2 (`optimizer.galore`) on the hidden matrices: project, inner step,
    back-project, (Muon: its shape factor on the full matrix), decay, lr."""
    settings = cfg["galore"]
    projected = galore(inner, rank=int(settings["rank"]),
                       update_every=int(settings["update_every"]),
                       scale="rank" if muon else float(settings["scale"]),
                       svd=settings["svd"])
    shape = [_muon_shape_scale(cfg["muon"]["consistent_rms"])] if muon else []
    return optax.chain(projected, *shape, optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def _galore2(cfg, rates: Rates, inner: optax.GradientTransformation, *, muon: bool
             ) -> optax.GradientTransformation:
    matrices = optax.inject_hyperparams(
        functools.partial(_galore_matrices, inner=inner, cfg=cfg, muon=muon))(
        learning_rate=rates.lr, weight_decay=rates.wd)
    return optax.partition({"matrix": matrices, "other": _other_adamw(cfg, rates)},
                           matrix_labels)


def _galore2_adam(cfg, rates: Rates) -> optax.GradientTransformation:
    """GaLore 2 with a rank-r Adam inner step (`optimizer.adamw`'s betas)."""
    adamw = cfg["adamw"]
    inner = optax.scale_by_adam(b1=adamw["b1"], b2=adamw["b2"], eps=adamw["eps"])
    return _galore2(cfg, rates, inner, muon=False)


def _galore2_muon_8bit(cfg, rates: Rates) -> optax.GradientTransformation:
    """GaLore 2 with an 8-bit Muon inner step (`optimizer.muon`, `optimizer.int8`)."""
    muon = cfg["muon"]
    inner = _quantized(cfg, optax.contrib.scale_by_muon(
        beta=muon["momentum"], ns_steps=int(muon["ns_steps"]), eps=muon["eps"],
        weight_dimension_numbers=_every_matrix))
    return _galore2(cfg, rates, inner, muon=True)


# optimizer.name -> its builder: (the optimizer group, the schedules) -> the transform
BUILDERS: dict[str, Callable[[Mapping[str, Any], Rates], optax.GradientTransformation]] = {
    "adamw": _adamw,
    "lion": _lion,
    "muon": functools.partial(_hybrid_muon, quantize=False),
    "muon_8bit": functools.partial(_hybrid_muon, quantize=True),
    "galore2": _galore2_adam,
    "galore2_muon_8bit": _galore2_muon_8bit,
}
OPTIMIZERS = tuple(BUILDERS)


def build_optimizer(cfg: Mapping[str, Any], total_steps: int
                    ) -> tuple[optax.GradientTransformation, Schedule]:
    """The optax chain for `cfg` (the run config's `optimizer` group) and its LR schedule.

    The chain is `clip_by_global_norm -> optimizer`; the returned schedule gives the
    primary learning rate (`lr`, the hidden matrices' rate) for logging.
    """
    name = cfg["name"]
    if name not in BUILDERS:
        raise ConfigError(f"unknown optimizer.name {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    lr_factor, wd_factor = lr_schedule(cfg, total_steps)

    def lr(s):
        return cfg["lr"] * lr_factor(s)

    def adam_lr(s):
        return cfg["adam_lr"] * lr_factor(s)

    def wd(s):
        return cfg["weight_decay"] * wd_factor(s)

    tx = BUILDERS[name](cfg, Rates(lr, adam_lr, wd))
    if cfg["grad_clip"]:
        tx = optax.chain(optax.clip_by_global_norm(cfg["grad_clip"]), tx)
    return tx, lr
