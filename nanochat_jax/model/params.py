"""The parameter tree: its path names, its scanned block stack, and one table (`PARAMS`) that
says of every parameter how it is sharded and what it is to the optimizer, FIRE and packing.

A parameter's name is its "/"-joined Flax path (`block_0/attn/q/kernel`, `path_name`).
`PARAMS` maps names (searched regexes) to the logical axis names of the parameter's
dimensions (model/axes.py maps those to the mesh) and to its role:

- HIDDEN: a BitLinear kernel `[in, out]` (attention's q, k, v, o; the FFN's w1, w2, w3;
  MTP's proj): Muon or GaLore updates it (optim/factory.py), FIRE re-initialises it
  (optim/fire.py), inference packs it to I2 (model/packed.py); it decays;
- MATRIX: any other weight matrix (the embedding, the LM head, mHC's phi, LoopLM's exit
  gate): AdamW; it decays;
- GAIN: a norm's scale, a bias, or one of mHC's small maps (b_pre, b_post, b_res, alpha):
  AdamW, never decayed (a decayed `b_res` would pull H_res from identity to uniform).

A parameter no row matches stops the first reader (the shardings at start-up, the
optimizer's init, FIRE, packing) with its name and the row to add, so a new feature's
kernel is never silently left out of Muon, FIRE or packing. tests/model/test_params.py
checks the table against every BitLinear the model builds, in every feature.

Under `model.scan_layers` the blocks are one stack, `blocks/block/...` with a leading
[n_layers] axis (`STACK`); a row describes one layer's parameter, and `unscan` splits the
stack into `block_{i}/...`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.config import ModelConfig

STACK = "blocks"  # the nn.scan'd block stack (model.scan_layers): `blocks/block/...` [L, ...]

HIDDEN = "hidden"
MATRIX = "matrix"
GAIN = "gain"
ROLES = (HIDDEN, MATRIX, GAIN)


class Param(NamedTuple):
    """One row of `PARAMS`."""

    pattern: str  # searched in the parameter's name
    axes: tuple[str | None, ...]  # logical name of each dimension (None: never split)
    role: str  # HIDDEN, MATRIX or GAIN (module doc)


PARAMS: tuple[Param, ...] = (
    Param(r"(^|/)embed/embedding$", ("vocab", "embed"), MATRIX),
    Param(r"^lm_head$", ("embed", "vocab"), MATRIX),
    Param(r"/attn/(q|k|v)/kernel$", ("embed", "heads"), HIDDEN),
    Param(r"/attn/o/kernel$", ("heads", "embed"), HIDDEN),
    Param(r"/ffn/(w1|w3)/kernel$", ("embed", "mlp"), HIDDEN),
    Param(r"/ffn/w2/kernel$", ("mlp", "embed"), HIDDEN),
    Param(r"(^|/)proj/kernel$", (None, "embed"), HIDDEN),  # MTP: [2D, D] from [h; emb]
    Param(r"/phi$", ("embed", None), MATRIX),  # mHC: [n D, n^2 + 2n]
    Param(r"(^|/)exit_gate/kernel$", ("embed", None), MATRIX),  # LoopLM: [D, 1]
    Param(r"/(scale|bias|alpha|b_pre|b_post|b_res)$", (), GAIN),  # replicated
)


def path_names(path) -> tuple[str, ...]:
    """A jax.tree_util key path as plain names: ('block_0', 'attn', 'q', 'kernel'); dict keys,
    attribute names and sequence indices (other key kinds are left out)."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
    return tuple(names)


def path_name(path) -> str:
    """"block_0/attn/q/kernel" of a jax.tree_util key path."""
    return "/".join(path_names(path))


def find_param(name: str) -> Param | None:
    """The row of `PARAMS` for parameter `name` (None if no row matches)."""
    return next((row for row in PARAMS if re.search(row.pattern, name)), None)


def param_rule(name: str, shape: tuple[int, ...] = ()) -> Param:
    """The row of `PARAMS` for parameter `name` of `shape`; a ConfigError naming both, and the
    row to add, when none matches."""
    row = find_param(name)
    if row is None:
        raise ConfigError(
            f"parameter {name} {tuple(shape)} has no row in PARAMS ({__name__}): add one with "
            f"its logical axes and its role, {HIDDEN} for a BitLinear kernel (Muon, FIRE and "
            f"packing take it), else {MATRIX} or {GAIN}")
    return row


def logical_axes(name: str) -> tuple[str | None, ...] | None:
    """The logical axis names of one layer's parameter `name` (None if no row matches)."""
    row = find_param(name)
    return None if row is None else row.axes


def is_stacked(name: str) -> bool:
    """Whether parameter `name` lives in the scanned block stack (leading layer axis)."""
    return name.split("/")[0] == STACK


def param_axes(name: str, shape: tuple[int, ...] = ()) -> tuple[str | None, ...]:
    """The logical axes of a whole parameter: its row's, with the leading layer axis of the
    `nn.scan`'d stack (`blocks/...`, model.scan_layers) never split."""
    axes = param_rule(name, shape).axes
    return (None, *axes) if axes and is_stacked(name) else axes


def layer_ndim(path, leaf) -> int:
    """The rank of one layer's parameter: a leaf of the nn.scan'd stack (`blocks/...`,
    model.scan_layers) without its leading layer axis."""
    return len(leaf.shape) - is_stacked(path_name(path))


def role(path, leaf) -> str:
    """HIDDEN, MATRIX or GAIN (module doc) of the parameter at jax.tree_util key `path`; a
    ConfigError for a parameter with no row, or a matrix row on a leaf that is not one
    `[in, out]` matrix per layer."""
    name = path_name(path)
    row = param_rule(name, leaf.shape)
    if row.role != GAIN and layer_ndim(path, leaf) != 2:
        raise ConfigError(f"parameter {name} {tuple(leaf.shape)} is declared {row.role} in "
                          f"PARAMS ({__name__}) but is not one [in, out] matrix per layer")
    return row.role


def is_hidden(path, leaf) -> bool:
    """Whether a parameter is a hidden matrix (a BitLinear kernel: Muon, FIRE, packing)."""
    return role(path, leaf) == HIDDEN


def is_decayed(path, leaf) -> bool:
    """Whether weight decay applies to a parameter (every weight matrix, no GAIN)."""
    return role(path, leaf) != GAIN


def unscanned(cfg: ModelConfig) -> ModelConfig:
    """The architecture of a model's unrolled twin (what decoding and export run)."""
    return dataclasses.replace(cfg, scan_layers=False)


def unscan(cfg: ModelConfig, params: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """The unrolled twin of a `scan_layers` model: `blocks/block/...` [L, ...] split into
    `block_{i}/...` (what decoding, packing and export read). Other models are returned as
    they are."""
    if not cfg.scan_layers:
        return cfg, params
    params = dict(params)
    stacked = params.pop(STACK)["block"]
    for i in range(cfg.n_layers):
        params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return unscanned(cfg), params
