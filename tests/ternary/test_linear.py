"""ternary_dot: kernel forward equals the fake-quant forward; gradients are the STE's."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from nanochat_jax.ternary import quant
from nanochat_jax.ternary.linear import ternary_dot


def _fake_quant(x, w):
    return jnp.dot(quant.quantize_activations_ste(x), quant.quantize_weights_ste(w))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 3, 72)), jnp.float32)  # leading batch dims
    w = jnp.asarray(rng.normal(size=(72, 40)) * 0.05, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 3, 40)), jnp.float32)
    return x, w, cot


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_forward_equals_fake_quant_forward(impl):
    x, w, _ = _inputs()
    y = ternary_dot(x, w, impl)
    chex.assert_shape(y, (2, 3, 40))
    assert_allclose(np.asarray(y), np.asarray(_fake_quant(x, w)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_gradients_are_the_straight_through_estimator(impl):
    x, w, cot = _inputs(1)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * cot)

    dx, dw = jax.grad(loss(lambda x, w: ternary_dot(x, w, impl)), (0, 1))(x, w)
    ex, ew = jax.grad(loss(_fake_quant), (0, 1))(x, w)
    assert_allclose(np.asarray(dx), np.asarray(ex), rtol=1e-5, atol=1e-6)
    assert_allclose(np.asarray(dw), np.asarray(ew), rtol=1e-5, atol=1e-6)
    # and they are the STE formulas: dx = g W_q^T, dW = x_q^T g
    x_q = quant.quantize_activations(x).reshape(-1, 72)
    assert_allclose(np.asarray(dw), np.asarray(x_q.T @ cot.reshape(-1, 40)), rtol=1e-5,
                    atol=1e-6)
    assert_allclose(np.asarray(dx), np.asarray(cot @ quant.quantize_weights(w).T), rtol=1e-5,
                    atol=1e-6)


def test_works_under_jit_and_value_and_grad():
    x, w, cot = _inputs(2)
    f = jax.jit(jax.value_and_grad(lambda w: jnp.sum(ternary_dot(x, w, "reference") * cot)))
    value, grad = f(w)
    assert np.isfinite(float(value)) and grad.shape == w.shape


def test_backward_runs_in_the_compute_dtype_with_fp32_accumulation():
    """bf16 activations: both backward matmuls take bf16 operands and accumulate in fp32
    (no fp32 upcast of the operands, the slow path on a GPU); dW comes out fp32 like W."""
    x, w, cot = _inputs(3)
    x, cot = x.astype(jnp.bfloat16), cot.astype(jnp.bfloat16)
    _, vjp = jax.vjp(lambda x, w: ternary_dot(x, w, "reference"), x, w)
    jaxpr = jax.make_jaxpr(vjp)(cot)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16]
        assert e.params["preferred_element_type"] == jnp.float32
    dx, dw = vjp(cot)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    ex, ew = jax.vjp(_fake_quant, x.astype(jnp.float32), w)[1](cot.astype(jnp.float32))
    assert_allclose(np.asarray(dw), np.asarray(ew), rtol=2e-2, atol=2e-2)
