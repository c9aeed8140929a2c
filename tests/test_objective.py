"""The training objective with MTP and LoopLM, and every combination
of the architecture features with ternary/dense weights and with every optimizer."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose

from experiments.configs import base
from nanochat_jax.collider import Carrier
from nanochat_jax.losses import Objective, cross_entropy, lm_objective
from nanochat_jax.model.config import ModelConfig, from_run_config
from nanochat_jax.model.loop import exit_distribution, exit_entropy
from nanochat_jax.model.mtp import shift_left
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import OPTIMIZERS, build_optimizer
from nanochat_jax.train.step import build_objective

PLAIN = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=64)
PAD = 0


def _batch(seed=0, pad_tail=2):
    """tokens [2, 9] with the second row padded at its end."""
    tokens = np.random.default_rng(seed).integers(1, 64, (2, 9))
    tokens[1, -pad_tail:] = PAD
    return jnp.asarray(tokens, jnp.int32)


def _split(tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return inputs, targets, targets != PAD


@functools.cache
def _model(**features):
    cfg = dataclasses.replace(PLAIN, **features)
    model = Transformer(cfg)
    return model, model.init(jax.random.PRNGKey(0), _batch()[:, :-1])["params"]


def _objective(params, model, obj, step=0, tokens=None):
    inputs, targets, mask = _split(_batch() if tokens is None else tokens)
    out = model.apply({"params": params}, inputs, method=Transformer.forward)
    return lm_objective(out, targets, mask, obj, jnp.asarray(step))


def test_shift_left_fills_past_the_end_and_never_wraps():
    x = jnp.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(shift_left(x, 2, -1), [[2, 3, 4, -1, -1], [7, 8, 9, -1, -1]])
    np.testing.assert_array_equal(shift_left(x, 0), x)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_mtp_depth_k_is_scored_against_the_token_k_further_on(kind):
    model, params = _model(mtp_depth=2, mtp_kind=kind)
    inputs, targets, mask = _split(_batch())
    out = model.apply({"params": params}, inputs, method=Transformer.forward)
    _, metrics, _ = lm_objective(out, targets, mask, Objective(PAD), jnp.asarray(0))
    for k in (1, 2):  # position i predicts targets[i + k] = token i + k + 1
        logits = out.mtp_hidden[k - 1][:, :-k] @ out.head
        want = cross_entropy(logits, targets[:, k:], mask[:, k:])
        assert_allclose(metrics[f"loss/mtp/depth{k}"], want, rtol=1e-5)
    assert_allclose(metrics["loss/mtp"], (metrics["loss/mtp/depth1"]
                                          + metrics["loss/mtp/depth2"]) / 2, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_mtp_hidden_at_position_i_sees_no_token_past_i_plus_k(kind):
    model, params = _model(mtp_depth=2, mtp_kind=kind)
    inputs = _batch()[:, :-1]
    out = model.apply({"params": params}, inputs, method=Transformer.forward)
    i = 3
    changed = inputs.at[:, i + 3:].set(7)  # depth 2 at position i may use tokens <= i + 2
    out2 = model.apply({"params": params}, changed, method=Transformer.forward)
    assert_allclose(out2.mtp_hidden[1][:, :i + 1], out.mtp_hidden[1][:, :i + 1], atol=1e-6)
    if kind == "parallel":  # parallel heads see only the trunk: tokens <= i
        out3 = model.apply({"params": params}, inputs.at[:, i + 1:].set(7),
                           method=Transformer.forward)
        assert_allclose(out3.mtp_hidden[1][:, :i + 1], out.mtp_hidden[1][:, :i + 1], atol=1e-6)


@pytest.mark.slow
def test_mtp_with_weight_zero_is_the_base_model_and_gradients_reach_the_trunk():
    base_model, base_params = _model()
    mtp_model, mtp_params = _model(mtp_depth=1)
    shared = {k: v for k, v in mtp_params.items() if not k.startswith("mtp_")}
    assert set(shared) == set(base_params)
    base_loss, base_grads = jax.value_and_grad(
        lambda p: _objective(p, base_model, Objective(PAD))[0])(shared)
    loss, grads = jax.value_and_grad(
        lambda p: _objective(p, mtp_model, Objective(PAD))[0])(mtp_params)
    assert_allclose(loss, base_loss, rtol=1e-6)
    assert_allclose(grads["block_0"]["attn"]["q"]["kernel"],
                    base_grads["block_0"]["attn"]["q"]["kernel"], rtol=1e-5, atol=1e-7)
    weighted = Objective(PAD, mtp_weight=lambda step: 0.3)
    grads = jax.grad(lambda p: _objective(p, mtp_model, weighted)[0])(mtp_params)
    trunk = grads["block_0"]["attn"]["q"]["kernel"] - base_grads["block_0"]["attn"]["q"]["kernel"]
    assert float(jnp.abs(trunk).max()) > 0  # nothing detached: MTP gradients reach the trunk


def test_mtp_loss_is_weighted_by_its_schedule():
    model, params = _model(mtp_depth=1)
    obj = Objective(PAD, mtp_weight=optax.join_schedules(
        [optax.constant_schedule(0.3), optax.constant_schedule(0.1)], [10]))
    for step, weight in ((0, 0.3), (10, 0.1)):
        loss, m, _ = _objective(params, model, obj, step)
        assert_allclose(loss, m["loss/ce"] + weight * m["loss/mtp"], rtol=1e-6)
        assert_allclose(m["loss/mtp_weight"], weight)


def test_looped_objective_is_expected_loss_minus_entropy_bonus():
    model, params = _model(loops=3)
    inputs, targets, mask = _split(_batch())
    out = model.apply({"params": params}, inputs, method=Transformer.forward)
    beta = 0.1
    obj = Objective(PAD, loop_entropy=lambda s: beta)
    loss, m, token_loss = lm_objective(out, targets, mask, obj, jnp.asarray(0))
    p = exit_distribution(out.exit_logits)  # [3, B, T]
    logp = jax.nn.log_softmax(out.hidden @ out.head, axis=-1)
    ce = -jnp.take_along_axis(logp, targets[None, ..., None], axis=-1)[..., 0]  # [3, B, T]
    per_token = jnp.sum(p * ce, 0) - beta * exit_entropy(p)
    m_f = mask.astype(jnp.float32)
    assert_allclose(loss, jnp.sum(per_token * m_f) / jnp.sum(m_f), rtol=1e-5)
    assert_allclose(token_loss, per_token * m_f, rtol=1e-5, atol=1e-6)
    assert_allclose(m["loss/ce"], cross_entropy(logp[-1], targets, mask), rtol=1e-5)
    steps = jnp.arange(1, 4)[:, None, None]
    assert_allclose(m["loop/mean_exit_step"], jnp.sum(jnp.sum(p * steps, 0) * m_f) / m_f.sum(),
                    rtol=1e-5)
    assert 1.0 <= float(m["loop/mean_exit_step"]) <= 3.0


def test_mhc_composite_gain_is_logged_and_near_one_at_init():
    model, params = _model(mhc_streams=4)
    _, m, _ = _objective(params, model, Objective(PAD))
    assert abs(float(m["mhc/composite_gain_forward"]) - 1) < 1e-4
    assert 1.0 <= float(m["mhc/composite_gain"]) < 1.1


# Every pair of levels of the four feature axes, in 9 cases (the orthogonal array L9(3^4);
# a two-level axis reads its third level as its first) instead of 36 for the whole product.
AXES = {"mtp": ((0, "sequential"), (2, "sequential"), (1, "parallel")),
        "mhc": ((0, True), (2, True), (2, False)),
        "ternary": (True, False, True), "loops": (1, 2, 1)}
L9 = ("0000", "0111", "0222", "1012", "1120", "1201", "2021", "2102", "2210")
COMBOS = [dict(ternary=AXES["ternary"][int(t)], mtp_depth=AXES["mtp"][int(m)][0],
               mtp_kind=AXES["mtp"][int(m)][1], loops=AXES["loops"][int(n)],
               mhc_streams=AXES["mhc"][int(h)][0], mhc_dynamic=AXES["mhc"][int(h)][1])
          for m, h, t, n in L9]


def test_the_feature_combinations_cover_every_pair_of_levels():
    def level(f, axis):
        return {"mtp": (f["mtp_depth"], f["mtp_kind"]), "ternary": f["ternary"],
                "mhc": (f["mhc_streams"], f["mhc_dynamic"]), "loops": f["loops"]}[axis]

    for a, b in itertools.combinations(AXES, 2):
        pairs = {(level(f, a), level(f, b)) for f in COMBOS}
        assert pairs == set(itertools.product(AXES[a], AXES[b])), (a, b)


@pytest.mark.slow  # compiles many model variants
@pytest.mark.parametrize("features", COMBOS,
                         ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_gradients_are_finite_for_feature_combinations(features):
    model, params = _model(**features)
    obj = Objective(PAD, mtp_weight=lambda s: 0.3, loop_entropy=lambda s: 0.1)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _objective(p, model, obj)[0]))(params)
    assert np.isfinite(float(loss))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in flat)
    assert float(optax.tree.norm(grads)) > 0


@functools.cache
def _all_features():
    """(run config, params, jitted value_and_grad) of the model with MTP, LoopLM, mHC and
    Collider (keep 0.7) on one batch: compiled once, shared by every optimizer."""
    config = base.get_config()
    config.optimizer.galore.rank = 8
    config.optimizer.int8.min_size = 256
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.training.steps = 4
    for group in ("mtp", "loop", "mhc", "collider"):
        config[group].enabled = True
    model, params = _model(mtp_depth=1, loops=2, mhc_streams=2)
    obj = build_objective(config, PAD, from_run_config(config))
    inputs, targets, mask = _split(_batch())

    def loss_fn(p):
        carrier = Carrier.start(inputs.shape, obj.keep_ratio)
        out = model.apply({"params": p}, inputs, carrier=carrier, method=Transformer.forward)
        loss, metrics, _ = lm_objective(out, targets, mask, obj, jnp.asarray(0))
        return loss, metrics

    return config, params, jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@pytest.mark.slow  # compiles many model variants
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_the_model_with_every_feature(optimizer):
    """Three updates of each optimizer on the all-features parameter tree (Collider's
    filtered gradients) lower the loss of the batch."""
    config, params, value_and_grad = _all_features()
    config = config.copy_and_resolve_references()
    config.optimizer.name = optimizer
    tx, _ = build_optimizer(config.optimizer, config.training.steps)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    losses = []
    for _ in range(3):
        (loss, metrics), grads = value_and_grad(params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]  # the same batch: three steps must lower its loss
    for tag in ("loss/mtp", "loop/mean_exit_step", "mhc/composite_gain", "collider/keep_ratio"):
        assert np.isfinite(float(metrics[tag]))


@pytest.mark.parametrize("mtp_weight", [0.0, 0.3])
def test_z_loss_is_the_same_term_with_or_without_mtp(mtp_weight):
    """total = CE + lambda * MTP + z * mean(lse^2 over the trained tokens), whatever lambda
    is (the MTP weight once replaced the z-loss's token mask)."""
    model, params = _model(mtp_depth=1)
    z = 1e-2
    obj = Objective(PAD, z_loss=z, mtp_weight=lambda s: jnp.asarray(mtp_weight))
    inputs, targets, mask = _split(_batch())
    out = model.apply({"params": params}, inputs, method=Transformer.forward)
    loss, metrics, _ = lm_objective(out, targets, mask, obj, jnp.asarray(0))
    logits = out.hidden[-1] @ out.head
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    z_term = z * jnp.sum(jnp.square(lse) * mask) / jnp.sum(mask)
    want = metrics["loss/ce"] + mtp_weight * metrics["loss/mtp"] + z_term
    assert_allclose(loss, want, rtol=1e-5)
