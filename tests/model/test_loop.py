"""LoopLM (docs/techniques.md#looplm): exit distribution, adaptive exit, and the looped stack."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.loop import early_exit_step, exit_distribution, exit_entropy
from nanochat_jax.model.transformer import Transformer

PLAIN = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=64)


def _logits(shape, seed, scale=3.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 8)), jnp.int32)


@pytest.mark.parametrize("loops", [2, 4, 8])
def test_exit_distribution_sums_to_one_and_entropy_is_at_most_log_loops(loops):
    gates = _logits((loops - 1, 3, 5), loops)
    gates = gates.at[0, 0, 0].set(60.0).at[-1, 0, 1].set(-60.0)  # saturated gates stay finite
    p = exit_distribution(gates)
    chex.assert_shape(p, (loops, 3, 5))
    assert bool(jnp.all(p >= 0))
    assert_allclose(p.sum(0), 1.0, atol=1e-6)
    assert bool(jnp.all(exit_entropy(p) <= np.log(loops) + 1e-6))


def test_constant_exit_probability_gives_the_geometric_distribution():
    c, loops = 0.3, 5
    gates = jnp.full((loops - 1,), float(np.log(c / (1 - c))))  # sigmoid(gate) = c
    p = np.asarray(exit_distribution(gates))
    want = [c * (1 - c) ** (t - 1) for t in range(1, loops)] + [(1 - c) ** (loops - 1)]
    assert_allclose(p, want, rtol=1e-5)


def test_uniform_exit_distribution_has_entropy_log_loops():
    p = jnp.full((4, 2), 0.25)
    assert_allclose(exit_entropy(p), np.log(4), rtol=1e-6)


def test_early_exit_step_is_the_first_loop_whose_cdf_reaches_the_threshold():
    gates = _logits((3, 64), 7)
    cdf = np.cumsum(np.asarray(exit_distribution(gates)), axis=0)
    for q in (0.0, 0.3, 0.6, 0.9, 1.0):
        step = np.asarray(early_exit_step(gates, q))
        want = [next((m for m in range(3) if cdf[m, i] >= q), 3) for i in range(64)]
        np.testing.assert_array_equal(step, want)
    assert (np.asarray(early_exit_step(gates, 0.0)) == 0).all()  # q = 0 exits at step 1


def _looped(loops):
    """(looped model, its params, the plain model, the plain params it shares)."""
    looped = Transformer(dataclasses.replace(PLAIN, loops=loops))
    params = looped.init(jax.random.PRNGKey(0), _tokens())["params"]
    shared = {k: v for k, v in params.items() if k not in ("exit_gate", "loop_norm")}
    return looped, params, Transformer(PLAIN), shared


@pytest.mark.slow
def test_one_loop_without_a_gate_is_the_plain_stack():
    looped, params, plain, shared = _looped(3)
    assert set(params) - set(shared) == {"exit_gate", "loop_norm"}  # weights are shared
    want = plain.apply({"params": shared}, _tokens())
    got = looped.apply({"params": params}, _tokens(), loops=1)
    assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    out = looped.apply({"params": params}, _tokens(), loops=1, method=Transformer.forward)
    assert out.exit_logits is None and out.hidden.shape[0] == 1


def test_each_loop_reapplies_the_same_blocks():
    looped, params, plain, shared = _looped(2)
    out = looped.apply({"params": params}, _tokens(), method=Transformer.forward)
    chex.assert_shape([out.hidden, out.exit_logits], [(2, 2, 8, 32), (1, 2, 8)])

    def twice(module, tokens):  # the plain stack, loop norm, the plain stack again
        x = module.embed(tokens)
        for block in module.blocks:
            x, _, _, _ = block(x)
        x = looped_norm(x)
        for block in module.blocks:
            x, _, _, _ = block(x)
        return module.final_norm(x)

    norm = nn.RMSNorm(epsilon=PLAIN.norm_eps)

    def looped_norm(x):
        return norm.apply({"params": params["loop_norm"]}, x)

    want = plain.apply({"params": shared}, _tokens(), method=twice)
    assert_allclose(out.hidden[1], want, rtol=1e-5, atol=1e-5)


def test_adaptive_exit_selects_each_tokens_loop():
    looped, params, *_ = _looped(3)
    out = looped.apply({"params": params}, _tokens(), method=Transformer.forward)
    first = looped.apply({"params": params}, _tokens(), exit_threshold=0.0,
                         method=Transformer.hidden_and_head)[0]
    last = looped.apply({"params": params}, _tokens(), exit_threshold=1.0,
                        method=Transformer.hidden_and_head)[0]
    assert_allclose(first, out.hidden[0], rtol=1e-6)
    assert_allclose(last, out.hidden[-1], rtol=1e-6)
    mid = looped.apply({"params": params}, _tokens(), exit_threshold=0.5,
                       method=Transformer.hidden_and_head)[0]
    step = early_exit_step(out.exit_logits, 0.5)
    want = jnp.take_along_axis(out.hidden, step[None, ..., None], axis=0)[0]
    assert_allclose(mid, want, rtol=1e-6)


def test_more_loops_than_configured_is_refused():
    looped, params, *_ = _looped(2)
    with pytest.raises(ConfigError, match="loops must be in 1..2"):
        looped.apply({"params": params}, _tokens(), loops=3)
