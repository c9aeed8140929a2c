"""mHC (docs/techniques.md#mhc): Sinkhorn projection, the hyper-connection residual, composite
gain."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.hyper import HyperMaps, composite_gain, hyper_residual, sinkhorn
from nanochat_jax.model.transformer import Transformer

PLAIN = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=64)


def _normal(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def test_sinkhorn_output_is_doubly_stochastic():
    logits = _normal((16, 4, 4), 0, scale=2.0)
    m = np.asarray(sinkhorn(logits, 20))
    assert (m >= 0).all()
    assert_allclose(m.sum(-1), 1.0, atol=1e-6)  # rows: normalised last, exact
    assert_allclose(m.sum(-2), 1.0, atol=5e-3)  # columns: within the iteration budget


def test_sinkhorn_converges_with_more_iterations():
    logits = _normal((16, 4, 4), 1, scale=5.0)  # far from doubly stochastic: slow to converge

    def col_error(iters):
        return np.abs(np.asarray(sinkhorn(logits, iters)).sum(-2) - 1).max()

    assert col_error(50) < col_error(5) < col_error(1)


def test_products_of_doubly_stochastic_matrices_stay_doubly_stochastic():
    maps = sinkhorn(_normal((24, 4, 4), 2), 30)
    product = maps[0]
    for h in maps[1:]:
        product = h @ product
    assert_allclose(product.sum(-1), 1.0, atol=1e-4)
    assert_allclose(product.sum(-2), 1.0, atol=1e-4)


def test_composite_gain_stays_bounded_where_the_unconstrained_one_grows():
    raw = _normal((24, 8, 4, 4), 3)  # 24 layers of per-token H~_res
    projected_fwd, projected_bwd = composite_gain(sinkhorn(raw, 20))
    unconstrained_fwd, unconstrained_bwd = composite_gain(jnp.exp(raw))
    assert abs(float(projected_fwd) - 1) < 1e-4  # rows are normalised last: exactly 1
    assert abs(float(projected_bwd) - 1) < 1e-2  # the one that drifts, slightly
    assert float(unconstrained_fwd) > 1e6 and float(unconstrained_bwd) > 1e6


def test_composite_gain_of_identities_is_one_and_of_a_scaling_is_its_power():
    eye = jnp.broadcast_to(jnp.eye(4), (6, 3, 4, 4))
    assert_allclose(composite_gain(eye), (1.0, 1.0))
    assert_allclose(composite_gain(2.0 * eye), (64.0, 64.0))


def test_one_stream_with_identity_maps_is_the_plain_residual():
    x = _normal((2, 5, 1, 8), 4)

    def f(h):
        return jnp.tanh(h) * 3.0

    ones = jnp.ones((2, 5, 1))
    out = hyper_residual(x, f, ones, ones, ones[..., None])
    assert_allclose(out[:, :, 0], x[:, :, 0] + f(x[:, :, 0]), rtol=1e-6)


def test_hyper_residual_mixes_streams_as_the_formula_says():
    n, d = 3, 4
    x = _normal((1, 2, n, d), 5)
    pre, post = jax.nn.softmax(_normal((1, 2, n), 6)), _normal((1, 2, n), 7)
    res = sinkhorn(_normal((1, 2, n, n), 8), 20)

    def f(h):
        return 2.0 * h

    out = hyper_residual(x, f, pre, post, res)
    b, t = 0, 1
    read = sum(pre[b, t, j] * x[b, t, j] for j in range(n))
    for i in range(n):
        want = sum(res[b, t, i, j] * x[b, t, j] for j in range(n)) + post[b, t, i] * f(read)
        assert_allclose(out[b, t, i], want, rtol=1e-5, atol=1e-6)


def test_maps_have_their_ranges_and_static_maps_are_shared_by_tokens():
    x = _normal((2, 6, 4, 16), 9)
    for dynamic in (True, False):
        maps = HyperMaps(4, dynamic=dynamic)
        pre, post, res = maps.apply(maps.init(jax.random.PRNGKey(0), x, 1), x, 1)
        chex.assert_shape([pre, post, res], [(2, 6, 4), (2, 6, 4), (2, 6, 4, 4)])
        assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()
        assert_allclose(res.sum(-1), 1.0, atol=1e-5)
        assert int(jnp.argmax(pre[0, 0])) == 1  # initialised to read stream `layer mod n`
        spread = float(jnp.max(jnp.abs(res - res[:1, :1])))
        assert (spread == 0.0) != dynamic  # dynamic maps differ per token, static do not


@pytest.mark.slow
def test_model_with_one_stream_and_identity_maps_equals_the_plain_model():
    """n = 1 static mHC with H_pre = H_post = H_res = 1 is exactly the plain residual."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    plain = Transformer(PLAIN)
    params = plain.init(jax.random.PRNGKey(0), tokens)["params"]
    hyper = Transformer(dataclasses.replace(PLAIN, mhc_streams=1, mhc_dynamic=False))
    hyper_params = hyper.init(jax.random.PRNGKey(1), tokens)["params"]
    merged = {**hyper_params, **params}
    for i in range(PLAIN.n_layers):
        block = dict(params[f"block_{i}"])
        for name in ("hyper_attn", "hyper_ffn"):
            maps = dict(hyper_params[f"block_{i}"][name])
            maps["b_pre"] = jnp.full((1,), 40.0)  # sigmoid(40) == 1 in float32
            assert float(2 * jax.nn.sigmoid(maps["b_post"])[0]) == 1.0  # b_post inits at 0
            block[name] = maps
        merged[f"block_{i}"] = block
    want = plain.apply({"params": params}, tokens)
    got = hyper.apply({"params": merged}, tokens)
    assert_allclose(got, want, rtol=1e-5, atol=1e-5)
