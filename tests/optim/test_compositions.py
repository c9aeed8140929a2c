"""Every optimizer composition the factory builds: trains, composes, checkpoints, accounts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments.configs import base
from nanochat_jax.losses import chunked_cross_entropy
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import OPTIMIZERS, build_optimizer
from nanochat_jax.optim.memory import state_memory
from nanochat_jax.train.setup import abstract_train_state

CFG = ModelConfig(vocab_size=64, seq_len=16, d_model=64, n_layers=2, n_heads=4,
                  n_kv_heads=2, d_ff=128)
LRS = {"adamw": 3e-3, "lion": 3e-4, "muon": 0.02, "muon_8bit": 0.02, "galore2": 0.01,
       "galore2_muon_8bit": 0.02}


def _optimizer_config(name):
    c = base.get_config().optimizer
    c.name, c.lr, c.adam_lr = name, LRS[name], 3e-3
    c.schedule, c.warmup_steps = "constant", 0
    c.galore.rank, c.galore.update_every = 16, 10
    c.int8.min_size = 1024  # so the tiny model's matrices are stored in 8 bits
    return c


@pytest.fixture(scope="module")
def problem():
    model = Transformer(CFG)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 17)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens[:, :-1])["params"]

    def loss(p):
        h, head = model.apply({"params": p}, tokens[:, :-1], method=Transformer.hidden_and_head)
        return chunked_cross_entropy(h, head, tokens[:, 1:]).loss

    return params, loss


def _train(tx, params, loss, steps):
    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    state = tx.init(params)
    values = []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return params, state, values


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_composition_lowers_the_loss_inside_multisteps_and_round_trips_orbax(
        problem, name, tmp_path):
    """Inside optax.MultiSteps (2 micro-steps an update) on one fixed batch, both micro-steps'
    gradients are the batch's, so 80 micro-steps are 40 of the optimizer alone: the loss
    falls as it would without the wrapper, and the whole state saves and restores exactly."""
    params, loss = problem
    tx, _ = build_optimizer(_optimizer_config(name), total_steps=40)
    tx = optax.MultiSteps(tx, every_k_schedule=2)
    _, state, values = _train(tx, params, loss, 80)
    assert values[-1] < 0.7 * values[0], (name, values[0], values[-1])
    assert int(state.gradient_step) == 40
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        like = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = ckpt.restore(tmp_path / "state", like)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_optimizer_state_bytes_per_param_follow_the_formulas():
    c = base.get_config()
    c.model.preset = "125m"
    mem = {}
    for name in ("adamw", "muon", "muon_8bit", "galore2", "galore2_muon_8bit"):
        c.optimizer.name = name
        state = abstract_train_state(c)
        mem[name] = state_memory(state.params, state.opt_state)
    assert abs(mem["adamw"]["bytes_per_param"] - 8.0) < 1e-3  # two fp32 moments
    muon, muon8 = mem["muon"]["groups"], mem["muon_8bit"]["groups"]
    assert muon8["other"] == muon["other"]  # embedding / head / norms keep fp32 AdamW
    # one int8 code per momentum element + one fp32 scale per 256: 1/4 + 1/256 of fp32
    assert abs(muon8["matrix"] / muon["matrix"] - (0.25 + 1 / 256)) < 1e-3
    assert mem["galore2"]["bytes_per_param"] < mem["muon"]["bytes_per_param"]
    assert mem["galore2_muon_8bit"]["groups"]["matrix"] < 0.5 * mem["galore2"]["groups"]["matrix"]
