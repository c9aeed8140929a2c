"""Optimizer factory: hybrid Muon routing, AdamW, and the LR / weight-decay schedules."""

import copy
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from experiments.configs import base, e3
from nanochat_jax.errors import ConfigError
from nanochat_jax.losses import chunked_cross_entropy
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer, lr_schedule, matrix_labels

CFG = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=64)
HIDDEN_KERNELS = ("attn/q", "attn/k", "attn/v", "attn/o", "ffn/w1", "ffn/w2", "ffn/w3")

# The base run's optimizer group (its sub-groups included) at a constant rate; _cfg
# replaces top-level fields and merges the sub-groups it is given (galore=dict(rank=4)).
BASE = dict(base.get_config().optimizer.to_dict(), lr=3e-3, adam_lr=3e-3,
            schedule="constant", warmup_steps=0)


def _cfg(**overrides):
    cfg = copy.deepcopy(BASE)
    for name, value in overrides.items():
        if isinstance(value, dict):
            cfg[name].update(value)
        else:
            cfg[name] = value
    return cfg


TOTAL_STEPS = 20
# The two optimizers the training tests share (each compiles once): bitnet schedule with
# weight decay, no warmup, stage 2 from step 10.
TRAIN_CFGS = {
    "adamw": _cfg(name="adamw", lr=3e-3, schedule="bitnet", weight_decay=0.1),
    "muon": _cfg(name="muon", lr=0.02, adam_lr=3e-3, schedule="bitnet", weight_decay=0.1),
}


@functools.cache
def _optimizer(name):
    """(tx, lr schedule, jitted tx.update) for TRAIN_CFGS[name]."""
    tx, lr = build_optimizer(TRAIN_CFGS[name], total_steps=TOTAL_STEPS)
    return tx, lr, jax.jit(tx.update)


@functools.cache
def _model_and_params():
    model = Transformer(CFG)
    tokens = jnp.zeros((1, CFG.seq_len), jnp.int32)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _expected_hidden_paths():
    return {f"block_{i}/{name}/kernel" for i in range(CFG.n_layers) for name in HIDDEN_KERNELS}


def _leaves_with_paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    return {_path(p): x for p, x in flat}


def _find_states(state, cls):
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, cls))
    return [x for x in leaves if isinstance(x, cls)]


# --------------------------------------------------------------------------- Muon routing


def test_matrix_labels_send_exactly_hidden_kernels_to_muon():
    _, params = _model_and_params()
    labels = _leaves_with_paths(matrix_labels(params))
    muon = {p for p, label in labels.items() if label == "matrix"}
    adam = {p for p, label in labels.items() if label == "other"}
    assert muon == _expected_hidden_paths()
    assert muon | adam == set(labels)
    assert {"embed/embedding", "lm_head", "final_norm/scale"} <= adam
    for p in labels:
        if p.endswith("/scale"):
            assert p in adam
    assert len([p for p in adam if p.endswith("/scale")]) == 1 + 4 * CFG.n_layers


def test_matrix_labels_keep_tied_embedding_on_adam():
    model = Transformer(ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 8), jnp.int32))["params"]
    labels = _leaves_with_paths(matrix_labels(params))
    assert "lm_head" not in labels
    assert labels["embed/embedding"] == "other"
    assert {p for p, label in labels.items() if label == "matrix"} == _expected_hidden_paths()


def test_muon_momentum_state_lives_exactly_on_hidden_matrices():
    _, params = _model_and_params()
    tx, _ = build_optimizer(_cfg(name="muon", lr=0.02), total_steps=20)
    state = tx.init(params)
    muon_states = _find_states(state, optax.contrib.MuonState)
    assert len(muon_states) == 1
    momentum = _leaves_with_paths(muon_states[0].mu)
    param_leaves = _leaves_with_paths(params)
    assert set(momentum) == set(param_leaves)
    hidden = _expected_hidden_paths()
    for p, m in momentum.items():
        if p in hidden:
            assert isinstance(m, jax.Array), p
            chex.assert_equal_shape([m, param_leaves[p]])
            assert_array_equal(np.asarray(m), 0.0)
        else:
            assert isinstance(m, optax.MaskedNode), p


def test_muon_adam_branch_state_lives_exactly_off_hidden_matrices():
    _, params = _model_and_params()
    tx, _ = build_optimizer(_cfg(name="muon", lr=0.02), total_steps=20)
    # optax.contrib.muon's own AdamW branch receives no leaf (only matrices reach it)
    adam_states = [s for s in _find_states(tx.init(params), optax.ScaleByAdamState)
                   if jax.tree_util.tree_leaves(s.mu)]
    assert len(adam_states) == 1
    hidden = _expected_hidden_paths()
    for moment in (adam_states[0].mu, adam_states[0].nu):
        for p, m in _leaves_with_paths(moment).items():
            assert isinstance(m, optax.MaskedNode) == (p in hidden), p


def _batch(seed=1, batch=4):
    rng = np.random.default_rng(seed)
    tokens, targets = rng.integers(0, CFG.vocab_size, size=(2, batch, CFG.seq_len))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(targets, jnp.int32)


@jax.jit
def _value_and_grad(params, tokens, targets):
    """Model loss (chunked CE of the tiny Transformer) and its gradient w.r.t. params."""
    model, _ = _model_and_params()

    def loss(p):
        hidden, head = model.apply({"params": p}, tokens, method=Transformer.hidden_and_head)
        return chunked_cross_entropy(hidden, head, targets, chunk_size=32).loss

    return jax.value_and_grad(loss)(params)


def _newton_schulz(g, steps=5, eps=1e-8):
    """docs/techniques.md#muon in float64: quintic Newton-Schulz on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = np.asarray(g, np.float64)
    x = x / (np.linalg.norm(x) + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


@pytest.mark.slow
def test_muon_first_update_is_newton_schulz_of_gradient_and_adam_takes_sign_steps():
    """Muon on hidden matrices: W <- W (1 - lr wd) - lr sqrt(max(1, fan_out/fan_in)) NS(G)."""
    _, params = _model_and_params()
    cfg = TRAIN_CFGS["muon"]
    lr, adam_lr, wd = cfg["lr"], cfg["adam_lr"], cfg["weight_decay"]
    tx, _, update = _optimizer("muon")
    _, grads = _value_and_grad(params, *_batch())
    updates, state = update(grads, tx.init(params), params)
    up, g, w = _leaves_with_paths(updates), _leaves_with_paths(grads), _leaves_with_paths(params)
    # first Nesterov step: the momentum is a multiple of the gradient, and NS (like the global
    # norm clip) is scale-free. Flax kernels are [in, out]: fan_in = shape[0]
    for p in _expected_hidden_paths():
        fan_in, fan_out = up[p].shape
        expected = -lr * (np.sqrt(max(1.0, fan_out / fan_in)) * _newton_schulz(g[p])
                          + wd * np.asarray(w[p]))
        assert_allclose(np.asarray(up[p]), expected, rtol=1e-3, atol=1e-3 * lr, err_msg=p)
    # Adam's first step is a sign step of size adam_lr on every other leaf, plus decoupled
    # decay of the >= 2-D ones (every arm decays the embedding and head alike)
    for p in ("embed/embedding", "lm_head", "final_norm/scale", "block_0/attn_norm/scale"):
        u, gp = np.asarray(up[p]), np.asarray(g[p])
        if u.ndim >= 2:
            u = u + adam_lr * wd * np.asarray(w[p])
        big = np.abs(gp) > 1e-4  # where Adam's eps (1e-8) is negligible
        assert big.sum() >= 8, p
        assert np.all(np.sign(u[big]) == -np.sign(gp[big])), p
        step = np.abs(u[big])
        assert_allclose(step, step.mean(), rtol=1e-3, err_msg=p)
        assert np.isclose(step.mean(), adam_lr, rtol=1e-3), (p, step.mean())
    # and the momentum is now non-zero exactly where Muon runs
    momentum = _leaves_with_paths(_find_states(state, optax.contrib.MuonState)[0].mu)
    for p in _expected_hidden_paths():
        assert np.abs(np.asarray(momentum[p])).max() > 0


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "bitnet"])
def test_warmup_ramps_linearly_from_zero(schedule):
    lr, wd = lr_schedule(_cfg(schedule=schedule, warmup_steps=10), total_steps=100)
    values = np.array([float(lr(s)) for s in range(11)])
    assert values[0] == 0.0
    assert_allclose(values, np.arange(11) / 10, atol=1e-6)
    assert float(wd(0)) == 1.0


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "bitnet"])
def test_without_warmup_schedules_start_at_one(schedule):
    lr, _ = lr_schedule(_cfg(schedule=schedule, warmup_steps=0), total_steps=100)
    assert_allclose(float(lr(0)), 1.0, rtol=1e-6)


def test_bitnet_schedule_drops_lr_abruptly_and_stops_weight_decay_at_stage2():
    total, warmup, ratio = 100, 10, 2 / 3
    cfg = _cfg(schedule="bitnet", warmup_steps=warmup, stage2_at=0.5, stage2_lr_ratio=ratio)
    lr, wd = lr_schedule(cfg, total)
    linear, _ = lr_schedule(_cfg(schedule="linear", warmup_steps=warmup), total)
    boundary = 50
    for s in range(total + 1):
        factor = 1.0 if s < boundary else ratio
        assert_allclose(float(lr(s)), float(linear(s)) * factor, rtol=1e-6, atol=1e-7)
        assert float(wd(s)) == (1.0 if s < boundary else 0.0), s
    before, after = float(lr(boundary - 1)), float(lr(boundary))
    assert_allclose(after / before, ratio, rtol=0.03)  # abrupt: one step, ~the full ratio
    assert_allclose(float(lr(total)), 0.1 * ratio, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_end_at_min_lr_ratio(schedule):
    lr, wd = lr_schedule(_cfg(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1), 110)
    assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    assert_allclose(float(lr(110)), 0.1, rtol=1e-5)
    assert_allclose(float(lr(60)), 0.55, rtol=1e-5)  # halfway: both are at the mean
    values = [float(lr(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert float(wd(110)) == 1.0


def test_cosine_schedule_has_cosine_shape():
    lr, _ = lr_schedule(_cfg(schedule="cosine", warmup_steps=0, min_lr_ratio=0.1), 100)
    for s in (10, 25, 75, 90):
        expected = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / 100))
        assert_allclose(float(lr(s)), expected, rtol=1e-5)


def test_constant_schedule_holds_after_warmup():
    lr, wd = lr_schedule(_cfg(schedule="constant", warmup_steps=5), 100)
    for s in (5, 50, 100):
        assert_allclose(float(lr(s)), 1.0, rtol=1e-6)
        assert float(wd(s)) == 1.0


@pytest.mark.parametrize("name,key", [("adamw", "lr"), ("muon", "lr")])
def test_build_optimizer_returns_the_primary_lr_schedule(name, key):
    cfg = _cfg(name=name, lr=0.02, schedule="bitnet", warmup_steps=10)
    _, lr = build_optimizer(cfg, total_steps=100)
    factor, _ = lr_schedule(cfg, 100)
    for s in (0, 5, 30, 50, 99):
        assert_allclose(float(lr(s)), cfg[key] * float(factor(s)), rtol=1e-6, atol=1e-9)


def test_unknown_optimizer_name_raises_config_error():
    with pytest.raises(ConfigError) as err:
        build_optimizer(_cfg(name="sgd"), total_steps=10)
    assert "sgd" in str(err.value)
    assert "adamw" in str(err.value) and "muon" in str(err.value)


def test_unknown_schedule_raises_config_error():
    with pytest.raises(ConfigError) as err:
        build_optimizer(_cfg(schedule="step"), total_steps=10)
    assert "step" in str(err.value)
    for name in ("constant", "linear", "cosine", "bitnet"):
        assert name in str(err.value)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_steps_reduce_the_loss(name):
    _, params = _model_and_params()
    tx, _, update = _optimizer(name)
    batch = _batch()
    state = tx.init(params)
    losses = []
    for _ in range(TOTAL_STEPS + 1):  # the last loss is that of the params after 20 updates
        loss, grads = _value_and_grad(params, *batch)
        losses.append(float(loss))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses  # ln(64) = 4.16 -> about 3.0 in practice


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_bitnet_stage2_weight_decay_is_really_zero(name):
    """Zero gradients: before stage 2 decoupled decay shrinks W by (1 - lr wd); after, nothing."""
    _, params = _model_and_params()
    tx, lr_of, update = _optimizer(name)
    wd = TRAIN_CFGS[name]["weight_decay"]
    boundary = round(TRAIN_CFGS[name]["stage2_at"] * TOTAL_STEPS)
    assert wd > 0 and 0 < boundary < TOTAL_STEPS
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    hidden = _expected_hidden_paths()
    for s in range(TOTAL_STEPS):
        assert float(lr_of(s)) > 0
        updates, state = update(zeros, state, params)
        new = optax.apply_updates(params, updates)
        old_leaves, new_leaves = _leaves_with_paths(params), _leaves_with_paths(new)
        for p in hidden:
            old, cur = np.asarray(old_leaves[p]), np.asarray(new_leaves[p])
            if s < boundary:
                assert np.linalg.norm(cur) < np.linalg.norm(old), (s, p)
                assert_allclose(cur, old * (1 - float(lr_of(s)) * wd), rtol=1e-6, atol=1e-9)
            else:
                assert_array_equal(cur, old, err_msg=f"step {s} {p}")
        for p in old_leaves:  # norms are never decayed
            if p.endswith("scale"):
                assert_array_equal(np.asarray(new_leaves[p]), np.asarray(old_leaves[p]))
        params = new


# ------------------------------------------------------------------- fair comparisons


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "lion", "muon", "muon_8bit", "galore2",
                                  "galore2_muon_8bit"])
def test_every_arm_decays_the_same_leaves(name):
    """Zero gradients: every >= 2-D weight, the embedding and head included, shrinks by its
    group's lr x weight_decay in every arm; norms never (the hybrids once left their AdamW
    group undecayed)."""
    _, params = _model_and_params()
    cfg = _cfg(name=name, lr=0.02, adam_lr=3e-3,
               galore=dict(rank=4, update_every=10, scale=0.25, svd="full"),
               int8=dict(block_size=256, min_size=64))
    tx, _ = build_optimizer(cfg, total_steps=TOTAL_STEPS)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = _leaves_with_paths(optax.apply_updates(params, updates))
    old = _leaves_with_paths(params)
    lr_of = {"embed/embedding": cfg["lr"] if name in ("adamw", "lion") else cfg["adam_lr"]}
    for p in ("embed/embedding", "lm_head", "block_0/attn/q/kernel"):
        assert np.linalg.norm(new[p]) < np.linalg.norm(old[p]), (name, p)
    assert_allclose(new["embed/embedding"], old["embed/embedding"]
                    * (1 - lr_of["embed/embedding"] * cfg["weight_decay"]), rtol=1e-6)
    for p in old:
        if p.endswith("scale"):
            assert_array_equal(np.asarray(new[p]), np.asarray(old[p]))


def test_galore_muon_steps_like_muon_at_the_same_lr():
    """On a 128x384 kernel at rank 32 the GaLore + 8-bit Muon update had 1/12.5 of Muon's
    norm per unit lr (no shape factor, scale 0.25, rank-32 orthogonal update): now both the
    shape factor and the rank are accounted for."""
    w = jax.random.normal(jax.random.key(0), (128, 384)) * 0.02
    params = {"block_0": {"ffn": {"w1": {"kernel": w}}}}
    grads = {"block_0": {"ffn": {"w1": {"kernel": jax.random.normal(jax.random.key(1),
                                                                    (128, 384))}}}}
    norms = {}
    for name in ("muon", "galore2_muon_8bit"):
        cfg = _cfg(name=name, lr=1.0, weight_decay=0.0, grad_clip=0.0,
                   galore=dict(rank=32, update_every=200, scale=0.25, svd="full"),
                   int8=dict(block_size=256, min_size=4096))
        tx, _ = build_optimizer(cfg, total_steps=10)
        updates, _ = tx.update(grads, tx.init(params), params)
        norms[name] = float(jnp.linalg.norm(updates["block_0"]["ffn"]["w1"]["kernel"]))
    # (Muon's 5 Newton-Schulz steps leave singular values in ~[0.7, 1.2], not 1: the full
    # 128 of a Gaussian matrix average lower than the top 32 the projection keeps, 16.9 vs
    # 19.1 here; the rank factor assumes exact orthogonalisation)
    assert norms["galore2_muon_8bit"] == pytest.approx(norms["muon"], rel=0.15), norms


@pytest.mark.slow
def test_lion_uses_its_own_betas_and_e3_lion_steps_3_to_10x_smaller_than_adamw():
    """Lion with AdamW's b2 0.95 and lr 1.5e-3 took updates 1.6x AdamW's RMS; e3_lion's
    settings (lr 5x below, decay 5x above, b2 0.99) take them 3-10x smaller."""
    lion_cfg = e3.get_config("lion").optimizer
    assert (lion_cfg.lion.b1, lion_cfg.lion.b2) == (0.9, 0.99)
    assert lion_cfg.lr * lion_cfg.weight_decay == pytest.approx(
        base.get_config().optimizer.lr * base.get_config().optimizer.weight_decay)
    _, params = _model_and_params()
    rms = {}
    for name, cfg in (("adamw", base.get_config().optimizer), ("lion", lion_cfg)):
        cfg.schedule, cfg.warmup_steps = "constant", 0
        tx, _ = build_optimizer(cfg, total_steps=TOTAL_STEPS)
        state, total = tx.init(params), []
        for seed in range(5):  # noisy gradients: AdamW's steps shrink below lr, Lion's do not
            grads = jax.tree.map(lambda x, k=seed: 1e-3 * jax.random.normal(
                jax.random.key(k), x.shape), params)
            updates, state = tx.update(grads, state, params)
            total.append(float(optax.tree.norm(updates)))
        rms[name] = np.mean(total)
    assert 3 <= rms["adamw"] / rms["lion"] <= 10, rms
    # and the optimizer runs with them: Lion's momentum after one step is (1 - b2) g
    tx, _ = build_optimizer(_cfg(name="lion", lion=dict(b2=0.99), grad_clip=0.0),
                            total_steps=TOTAL_STEPS)
    ones = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(ones, tx.init(params), params)
    (lion_state,) = _find_states(state, optax.ScaleByLionState)
    assert_allclose(np.asarray(lion_state.mu["lm_head"]), 0.01, rtol=1e-5)
