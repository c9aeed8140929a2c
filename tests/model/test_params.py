"""The parameter table: every parameter of every feature has one row, the hidden matrices are
exactly the BitLinear kernels, and whoever reads the table (Muon, FIRE, packing, sharding)
refuses a parameter it does not declare."""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from nanochat_jax.errors import ConfigError
from nanochat_jax.model import params as params_lib
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.layers import BitLinear
from nanochat_jax.model.packed import pack_params
from nanochat_jax.model.params import GAIN, HIDDEN, Param, is_hidden, path_name, role
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import matrix_labels
from nanochat_jax.optim.fire import fire_params
from nanochat_jax.train import sharding

CFG = dict(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
# every level of every feature at least once: MTP (sequential, parallel), LoopLM, mHC
# (dynamic, static), the scanned stack under remat, tied embeddings, the dense twin
FEATURES = {
    "plain": {},
    "mtp_loop_mhc_tied": dict(mtp_depth=1, loops=2, mhc_streams=2, tie_embeddings=True),
    "parallel_mtp_static_mhc_scanned": dict(mtp_depth=2, mtp_kind="parallel", mhc_streams=2,
                                            mhc_dynamic=False, scan_layers=True, remat="full"),
    "dense_looped_scanned_mhc": dict(ternary=False, loops=2, scan_layers=True, mhc_streams=2),
}
MESH = AbstractMesh((1, 1, 1), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
ROUTER = "block_0/router/kernel"  # a new feature's kernel that PARAMS does not declare


def _shapes_and_bitlinear_kernels(**features):
    """(param shapes, the names of the kernels of every BitLinear the model builds)."""
    built = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, BitLinear) and context.method_name == "__call__":
            built.add("/".join(context.module.path + ("kernel",)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(Transformer(ModelConfig(**CFG, **features)).init,
                                jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    return shapes["params"], built


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_every_parameter_is_declared_and_the_hidden_ones_are_exactly_the_bitlinear_kernels(
        features):
    shapes, bitlinear_kernels = _shapes_and_bitlinear_kernels(**features)
    roles = {path_name(p): role(p, leaf)
             for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    hidden = {name for name, r in roles.items() if r == HIDDEN}
    assert hidden == bitlinear_kernels
    assert {"embed/embedding"} <= set(roles) - hidden


def _with_router() -> dict:
    """A declared embedding and a new feature's kernel [D, 4]."""
    return {"embed": {"embedding": jnp.ones((64, 32))},
            "block_0": {"router": {"kernel": jnp.ones((32, 4))}}}


READERS = {
    "muon": matrix_labels,
    "fire": fire_params,
    "packing": pack_params,
    "sharding": lambda p: sharding.param_specs(p, MESH),
}


@pytest.mark.parametrize("reader", READERS.values(), ids=READERS.keys())
def test_an_undeclared_kernel_is_refused_by_name_with_the_row_to_add(reader):
    with pytest.raises(ConfigError, match=f"{ROUTER} \\(32, 4\\) has no row in PARAMS") as err:
        reader(_with_router())
    assert "model.params" in str(err.value) and HIDDEN in str(err.value)


def test_declaring_a_kernel_hidden_is_all_muon_fire_packing_and_sharding_need(monkeypatch):
    row = Param(r"/router/kernel$", ("embed", None), HIDDEN)
    monkeypatch.setattr(params_lib, "PARAMS", params_lib.PARAMS + (row,))
    tree = _with_router()
    assert matrix_labels(tree)["block_0"]["router"]["kernel"] == "matrix"
    fired = fire_params(tree, iters=2)
    assert not np.array_equal(fired["block_0"]["router"]["kernel"],
                              tree["block_0"]["router"]["kernel"])
    assert np.array_equal(fired["embed"]["embedding"], tree["embed"]["embedding"])
    assert "router" in pack_params(tree)["packed"]["block_0"]
    assert "router" in sharding.param_specs(tree, MESH)["block_0"]


def test_a_hidden_row_on_a_leaf_that_is_not_one_matrix_per_layer_is_refused():
    tree = {"block_0": {"attn": {"q": {"kernel": jnp.ones((4, 4, 4))}}}}
    path, leaf = jax.tree_util.tree_flatten_with_path(tree)[0][0]
    with pytest.raises(ConfigError, match="block_0/attn/q/kernel .* not one \\[in, out\\]"):
        is_hidden(path, leaf)
    stacked = {"blocks": {"block": {"attn": {"q": {"kernel": jnp.ones((3, 4, 4))}}}}}
    path, leaf = jax.tree_util.tree_flatten_with_path(stacked)[0][0]
    assert is_hidden(path, leaf)  # [n_layers, in, out]: one matrix per layer


def test_small_maps_are_gains_even_when_two_dimensional():
    tree = {"block_0": {"hyper_attn": {"b_res": jnp.zeros((2, 2)), "phi": jnp.zeros((8, 8))}}}
    roles = {path_name(p): role(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert roles == {"block_0/hyper_attn/b_res": GAIN, "block_0/hyper_attn/phi": "matrix"}


class _State(NamedTuple):
    mu: Any


def test_path_name_joins_dict_keys_attribute_names_and_sequence_indices():
    tree = {"opt": (_State(mu={"block_0": {"kernel": 1}}),), "count": 2}
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == ["count", "opt/0/mu/block_0/kernel"]
