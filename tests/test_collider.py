"""Collider token filtering (docs/techniques.md#collider): the filtered linear, the keep mask, and
the filtered gradients of the whole model."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from experiments.configs import base
from nanochat_jax.collider import Carrier, filtered_linear, keep_mask, kept_count, linear
from nanochat_jax.errors import ConfigError
from nanochat_jax.losses import Objective, lm_objective
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary import quant
from nanochat_jax.train.setup import setup
from nanochat_jax.train.step import build_objective

PLAIN = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=64)
PAD = 0


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _mask(shape, kept, seed):
    m = np.zeros(int(np.prod(shape)), np.float32)
    m[np.random.default_rng(seed).choice(m.size, kept, replace=False)] = 1.0
    return jnp.asarray(m.reshape(shape))


def test_kept_count_is_static_and_at_least_one():
    assert kept_count(0.5, 64) == 32 and kept_count(0.7, 10) == 7
    assert kept_count(0.001, 10) == 1 and kept_count(1.0, 10) == 10


def test_keep_mask_keeps_the_top_scores_and_never_prefers_padding():
    scores = jnp.asarray([[5.0, 1.0, 9.0, 3.0], [7.0, 0.5, 8.0, 2.0]])
    valid = jnp.asarray([[True, True, True, True], [True, True, False, True]])
    keep = keep_mask(scores, valid, 3)
    assert_array_equal(keep, [[1, 0, 1, 0], [1, 0, 0, 0]])  # 8.0 is padding: skipped


@pytest.mark.parametrize("mode", ["dense", "fake_quant", "kernel"])
def test_filtered_linear_equals_the_masked_dense_gradient(mode):
    """Gathering the kept rows gives exactly dW = X^T (keep * dY), dX = keep * (dY W^T)."""
    x, w, gy = _normal((2, 6, 16), 0), _normal((16, 8), 1), _normal((2, 6, 8), 2)
    keep = _mask((2, 6), 5, 3)
    y, vjp = jax.vjp(lambda x, w, c: filtered_linear(x, w, c, mode, "reference", 5), x, w,
                     jnp.zeros((2, 6)))
    dx, dw, dc = vjp((gy, keep))
    x_eff, w_eff = (x, w) if mode == "dense" else (quant.quantize_activations(x),
                                                    quant.quantize_weights(w))
    masked = gy * keep[..., None]
    assert_allclose(dw, jnp.einsum("btk,btn->kn", x_eff, masked), rtol=1e-5, atol=1e-5)
    assert_allclose(dx, masked @ w_eff.T, rtol=1e-5, atol=1e-5)
    assert_array_equal(dc, keep)  # passed on to the layers below
    assert_allclose(y[0], x_eff @ w_eff, rtol=1e-4, atol=1e-4)  # the forward is full


def test_without_attention_collider_is_the_exact_token_filtered_gradient():
    """A per-token MLP: filtering the backward changes nothing (Rho-1 exactly)."""
    x, w1, w2 = _normal((2, 8, 16), 4), _normal((16, 32), 5) / 4, _normal((32, 1), 6) / 4
    keep = _mask((2, 8), 6, 7)

    def rho1(w1, w2):  # loss over kept tokens, plain autodiff
        y = jnp.dot(jnp.tanh(jnp.dot(x, w1)), w2)[..., 0]
        return jnp.sum(jnp.square(y) * keep) / jnp.sum(keep)

    def collided(w1, w2):
        carrier = Carrier.start((2, 8), 6 / 16)
        h, carrier = linear(x, w1, carrier, "dense", "reference")
        y, carrier = linear(jnp.tanh(h), w2, carrier, "dense", "reference")
        return jnp.sum(jnp.square(y[..., 0]) * keep) / jnp.sum(keep) + jnp.sum(
            carrier.value * keep)

    for g, want in zip(jax.grad(collided, (0, 1))(w1, w2), jax.grad(rho1, (0, 1))(w1, w2),
                       strict=True):
        assert_allclose(g, want, rtol=1e-5, atol=1e-6)


@functools.cache
def _model(**features):
    cfg = dataclasses.replace(PLAIN, **features)
    model = Transformer(cfg)
    tokens = jnp.zeros((2, 8), jnp.int32)
    return model, model.init(jax.random.PRNGKey(0), tokens)["params"]


def _tokens(seed=0):
    """[2, 9]: 16 distinct input ids, so each embedding-gradient row is one position's."""
    ids = np.random.default_rng(seed).permutation(np.arange(1, 64))[:18].reshape(2, 9)
    return jnp.asarray(ids, jnp.int32)


def _grads(model, params, tokens, obj):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = targets != PAD

    def loss_fn(p):
        carrier = (Carrier.start(inputs.shape, obj.keep_ratio)
                   if obj.keep_ratio is not None and obj.sparse_backward else None)
        out = model.apply({"params": p}, inputs, carrier=carrier, method=Transformer.forward)
        return lm_objective(out, targets, mask, obj, jnp.asarray(0))[0]

    return jax.jit(jax.value_and_grad(loss_fn))(params)


# LoopLM and mHC alone are in the last combination (and each has its own case in the
# dropped-positions test below), which spares their compiles
FEATURES = [dict(), dict(ternary=False), dict(ternary_product="fake_quant"),
            dict(mtp_depth=2), dict(mtp_depth=1, mtp_kind="parallel"),
            dict(mtp_depth=1, loops=2, mhc_streams=2)]


@pytest.mark.slow  # compiles many model variants
@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(map(str, f.values()))
                         or "plain")
def test_keep_ratio_one_reproduces_the_exact_gradients(features):
    model, params = _model(**features)
    obj = Objective(PAD, mtp_weight=lambda s: 0.3, loop_entropy=lambda s: 0.1)
    loss, want = _grads(model, params, _tokens(), obj)
    got_loss, got = _grads(model, params, _tokens(), dataclasses.replace(obj, keep_ratio=1.0))
    assert_allclose(got_loss, loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_allclose(g, w, rtol=2e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("features", [dict(), dict(mhc_streams=2), dict(loops=2)],
                         ids=["plain", "mhc", "loop"])
def test_dropped_positions_send_no_gradient_to_the_embedding(features):
    """Dropped positions' cotangents are exactly 0 at every layer, down to the embedding
    (each input id occurs once, so embedding-gradient rows are positions)."""
    model, params = _model(**features)
    tokens = _tokens()
    obj = Objective(PAD, keep_ratio=0.5)
    _, grads = _grads(model, params, tokens, obj)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model.apply({"params": params}, inputs, method=Transformer.forward)
    _, _, token_loss = lm_objective(out, targets, targets != PAD, Objective(PAD),
                                    jnp.asarray(0))
    keep = np.asarray(keep_mask(token_loss, targets != PAD, 8)).astype(bool)
    rows = np.abs(np.asarray(grads["embed"]["embedding"])[np.asarray(inputs)]).sum(-1)
    assert (rows[~keep] == 0).all()
    assert (rows[keep] > 0).all()
    # without Collider the attention backward would reach them
    _, dense_grads = _grads(model, params, tokens, Objective(PAD))
    rows = np.abs(np.asarray(dense_grads["embed"]["embedding"])[np.asarray(inputs)]).sum(-1)
    assert (rows[~keep] > 0).any()


@pytest.mark.slow
def test_keep_ratio_is_logged_and_the_step_never_recompiles():
    config = base.get_config()
    config.collider.enabled = True
    config.collider.keep_ratio = 0.5
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.training.steps = 10
    built = setup(config, model_config=PLAIN, pad_id=PAD, seed=0)
    state, step = built.state, built.train_step
    losses = []
    for i in range(6):  # different keep patterns, same compiled step
        state, metrics = step(state, _tokens(i % 2))
        assert float(metrics["collider/keep_ratio"]) == 0.5
        if i % 2 == 0:
            losses.append(float(metrics["loss/total"]))
    assert step._cache_size() == 1
    assert losses[-1] < losses[0]  # training on half the positions still lowers the loss


@pytest.mark.slow
def test_without_the_sparse_backward_the_gradient_is_the_exact_filtered_loss_gradient():
    """collider.sparse_backward=False: the loss is filtered, the backward is plain autodiff
    (attention's gradient through dropped positions kept): Rho-1 without the savings."""
    config = base.get_config()
    config.collider.enabled = True
    config.collider.keep_ratio = 0.5
    config.collider.sparse_backward = False
    obj = build_objective(config, PAD, PLAIN)
    model, params = _model()
    tokens = _tokens()
    _, grads = _grads(model, params, tokens, obj)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model.apply({"params": params}, inputs, method=Transformer.forward)
    _, _, token_loss = lm_objective(out, targets, targets != PAD, Objective(PAD),
                                    jnp.asarray(0))
    keep = keep_mask(token_loss, targets != PAD, 8)

    def filtered_loss(p):
        out = model.apply({"params": p}, inputs, method=Transformer.forward)
        per_token = lm_objective(out, targets, targets != PAD, Objective(PAD), 0)[2]
        return jnp.sum(per_token * keep) / jnp.sum(keep)

    want = jax.jit(jax.grad(filtered_loss))(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        assert_allclose(g, w, rtol=2e-4, atol=1e-6)


def test_keep_ratio_outside_zero_one_is_refused():
    config = base.get_config()
    config.collider.enabled = True
    config.collider.keep_ratio = 1.5
    with pytest.raises(ConfigError, match="keep_ratio must be in"):
        build_objective(config, PAD, PLAIN)
