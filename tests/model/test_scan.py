"""`model.scan_layers`: the block stack as one nn.scan over depth computes, trains and shards
what the unrolled blocks do, with the parameters stacked [n_layers, ...]."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from numpy.testing import assert_allclose

from experiments.configs import base
from nanochat_jax.errors import ConfigError
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.kv_cache import KVCache
from nanochat_jax.model.params import is_hidden, unscan
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer
from nanochat_jax.optim.fire import fire_params
from nanochat_jax.train import sharding

CFG = ModelConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                  d_ff=64)
# mHC dense: its maps reorder float sums enough (1e-7) to flip a ternary activation's int8
# rounding somewhere, which moves logits by 1e-3; the dense twin compares exactly. (The dense
# stack alone: this mHC case, and every case of the optimizer test below.)
VARIANTS = {"plain": {}, "mhc": dict(mhc_streams=2, ternary=False), "looped": dict(loops=2),
            "mtp": dict(mtp_depth=1), "remat": dict(remat="full")}
FAST = ("plain", "mhc")  # the fast tier's; the others run in the slow tier


def _stack(unrolled: dict, n_layers: int) -> dict:
    """The scanned layout of unrolled params (the inverse of `unscan`)."""
    params = dict(unrolled)
    layers = [params.pop(f"block_{i}") for i in range(n_layers)]
    params["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return params


def _tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, CFG.seq_len), 0, CFG.vocab_size)


def _pair(**overrides):
    """(unrolled cfg, scanned cfg, unrolled params, the same params stacked)."""
    cfg = dataclasses.replace(CFG, **overrides)
    scanned = dataclasses.replace(cfg, scan_layers=True)
    params = Transformer(cfg).init(jax.random.key(1), _tokens())["params"]
    return cfg, scanned, params, _stack(params, cfg.n_layers)


@pytest.mark.parametrize("variant", [v if v in FAST else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
@pytest.mark.slow
def test_the_scanned_stack_gives_the_unrolled_logits_and_gradients(variant):
    cfg, scanned, params, stacked = _pair(**VARIANTS[variant])
    tokens = _tokens(2)

    def loss(cfg):
        def value(params):
            out = Transformer(cfg).apply({"params": params}, tokens, method=Transformer.forward)
            total = jnp.mean(jnp.square(out.hidden))
            if out.mtp_hidden is not None:
                total += jnp.mean(jnp.square(out.mtp_hidden))
            if out.res_maps is not None:
                total += jnp.mean(out.res_maps)
            return total
        return value

    logits = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
    assert_allclose(jax.jit(Transformer(scanned).apply)({"params": stacked}, tokens), logits,
                    rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(cfg)))(params)
    scanned_grads = jax.jit(jax.grad(loss(scanned)))(stacked)
    chex.assert_trees_all_close(unscan(scanned, scanned_grads)[1], grads, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_mhc_maps_of_a_scanned_stack_are_initialised_by_depth():
    """Sub-layer j of block l first reads stream (2 l + j) mod n, as in the unrolled stack:
    the depth is the scan's input, not a constant of the traced block."""
    _, scanned, params, _ = _pair(mhc_streams=4)
    scanned_params = Transformer(scanned).init(jax.random.key(3), _tokens())["params"]
    block = scanned_params["blocks"]["block"]
    for layer in range(CFG.n_layers):
        for j, name in enumerate(("hyper_attn", "hyper_ffn")):
            b_pre = block[name]["b_pre"][layer]
            assert int(jnp.argmax(b_pre)) == (2 * layer + j) % 4
            assert_allclose(b_pre, params[f"block_{layer}"][name]["b_pre"])


def test_stacked_kernels_are_hidden_matrices_and_shard_like_their_layers():
    _, _, params, stacked = _pair()
    kernels = [p for p, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]
               if is_hidden(p, leaf)]
    assert len(kernels) == 7  # q, k, v, o, w1, w2, w3: one stacked leaf each
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    unrolled_specs = sharding.param_specs(params, mesh)
    stacked_specs = sharding.param_specs(stacked, mesh)
    for name in ("q", "o"):
        layer = unrolled_specs["block_0"]["attn"][name]["kernel"]
        assert stacked_specs["blocks"]["block"]["attn"][name]["kernel"] == P(None, *layer)


OPTIMIZER = dict(base.get_config().optimizer.to_dict(), lr=3e-3, adam_lr=3e-3,
                 schedule="constant", warmup_steps=0)
OPTIMIZER["galore"] = dict(OPTIMIZER["galore"], rank=4, update_every=2, svd="full")


# (Lion, like AdamW, updates every leaf elementwise with the same decay mask: AdamW stands
# for both here; tests/optim checks Lion's own update.)
@pytest.mark.parametrize("name", ["muon", *[pytest.param(n, marks=pytest.mark.slow)
                                            for n in ("adamw", "galore2")]])
@pytest.mark.slow
def test_optimizers_update_a_stack_of_matrices_as_they_update_each_layer(name):
    """Muon orthogonalises each layer's matrix on its own (the layer axis is a batch axis),
    GaLore keeps one projector per layer: three steps on stacked params end where three
    steps on the unrolled params do (dense: a ternary model's int8 activation rounding
    flips on float reordering, and Adam turns a flipped tiny gradient into a full step)."""
    cfg, scanned, params, stacked = _pair(ternary=False)
    tx, _ = build_optimizer(dict(OPTIMIZER, name=name, lr=0.02 if "muon" in name else 3e-3),
                            total_steps=10)
    tokens = _tokens(4)

    def three_steps(cfg, params):
        def loss(p):
            return jnp.mean(jnp.square(Transformer(cfg).apply({"params": p}, tokens)))

        @jax.jit
        def step(params, state):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return jax.tree.map(jnp.add, params, updates), state

        state = tx.init(params)
        for _ in range(3):
            params, state = step(params, state)
        return params

    want = three_steps(cfg, params)
    got = unscan(scanned, three_steps(scanned, stacked))[1]
    chex.assert_trees_all_close(got, want, rtol=1e-3, atol=1e-4)  # a step is ~3e-3


def test_fire_reinitialises_each_layer_of_a_stack_on_its_own():
    _, scanned, params, stacked = _pair()
    want = fire_params(params, iters=30)
    got = unscan(scanned, fire_params(stacked, iters=30))[1]
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_scanned_model_decodes_only_after_unscan():
    cfg, scanned, _, stacked = _pair()
    cache = KVCache.zeros(cfg, batch=1, length=32)
    with pytest.raises(ConfigError, match="unscan"):
        Transformer(scanned).apply({"params": stacked}, jnp.zeros((1, 1), jnp.int32),
                                   jnp.zeros((1, 1), jnp.int32), cache,
                                   method=Transformer.decode)
    unrolled_cfg, unrolled = unscan(scanned, stacked)
    assert unrolled_cfg == cfg
    assert set(unrolled) == {f"block_{i}" for i in range(3)} | {"embed", "final_norm",
                                                                  "lm_head"}
    assert np.shape(unrolled["block_2"]["attn"]["q"]["kernel"]) == (32, 32)

