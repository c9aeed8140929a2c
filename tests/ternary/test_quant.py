"""Absmean ternary weights and per-token absmax int8 activations (docs/techniques.md#bitnet)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from nanochat_jax.ternary import quant


def _gaussian(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


def _rows_of_varied_scale(n=512, d=64, seed=0):
    """Gaussian rows whose magnitudes span four orders of magnitude."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.01, 100.0, size=(n, 1))
    return jnp.asarray(x.astype(np.float32))


# --------------------------------------------------------------------------- weights


def test_weight_scale_is_mean_abs():
    w = _gaussian((64, 48))
    assert_allclose(float(quant.weight_scale(w)), float(np.mean(np.abs(np.asarray(w)))),
                    rtol=1e-6)


def test_quantized_weights_take_three_values():
    w = _gaussian((64, 48), seed=1)
    g = float(np.mean(np.abs(np.asarray(w))))
    w_q = np.asarray(quant.quantize_weights(w))
    values = np.unique(w_q)
    assert len(values) == 3
    assert_allclose(values, [-g, 0.0, g], rtol=1e-6)


def test_ternary_codes_times_scale_equal_quantized_weights():
    w = _gaussian((64, 48), seed=2)
    codes, g = quant.ternary_codes(w)
    assert codes.dtype == jnp.int8
    assert set(np.unique(np.asarray(codes)).tolist()) == {-1, 0, 1}
    assert_array_equal(np.asarray(codes, np.float32) * np.float32(g),
                       np.asarray(quant.quantize_weights(w)))


def test_ternary_codes_round_w_over_g_to_nearest():
    """A code is +-1 exactly where |W| > g/2 (the rounding threshold), 0 elsewhere."""
    w = _gaussian((128, 64), seed=3)
    codes, g = quant.ternary_codes(w)
    w_np, g = np.asarray(w), float(g)
    expected = np.where(w_np > g / 2, 1, np.where(w_np < -g / 2, -1, 0))
    assert_array_equal(np.asarray(codes), expected)


@pytest.mark.parametrize("a", [0.5, 2.0, 3.0, 0.1, 7.3])
def test_weight_quantization_is_scale_equivariant(a):
    w = _gaussian((96, 80), seed=4)
    codes, _ = quant.ternary_codes(w)
    codes_a, _ = quant.ternary_codes(a * w)
    assert_array_equal(np.asarray(codes_a), np.asarray(codes))
    assert_allclose(np.asarray(quant.quantize_weights(a * w)),
                    a * np.asarray(quant.quantize_weights(w)), rtol=1e-6, atol=0)


def test_gaussian_weights_give_about_31_percent_zeros():
    # P(|N(0,1)| < sqrt(2/pi)/2) = 0.3101
    codes, _ = quant.ternary_codes(_gaussian((512, 512), seed=5))
    zero_fraction = float(np.mean(np.asarray(codes) == 0))
    assert 0.29 < zero_fraction < 0.33


def test_quantized_weights_keep_dtype():
    w = _gaussian((32, 16), seed=6).astype(jnp.bfloat16)
    assert quant.quantize_weights(w).dtype == jnp.bfloat16


# --------------------------------------------------------------------------- activations


def test_activation_rows_are_integer_multiples_of_absmax_over_127():
    x = _rows_of_varied_scale()
    x_q = np.asarray(quant.quantize_activations(x), np.float64)
    step = np.max(np.abs(np.asarray(x, np.float64)), axis=-1, keepdims=True) / 127.0
    multiples = x_q / step
    assert_allclose(multiples, np.round(multiples), atol=1e-4)
    assert np.max(np.abs(np.round(multiples))) <= 127
    # the integers are the int8 codes, and every element moved by at most half a step
    codes, _ = quant.int8_codes(x)
    assert_array_equal(np.round(multiples).astype(np.int64), np.asarray(codes, np.int64))
    assert np.all(np.abs(x_q - np.asarray(x, np.float64)) <= 0.5 * step * (1 + 1e-5))


def test_activation_row_max_maps_to_code_127():
    x = _rows_of_varied_scale()
    codes, _ = quant.int8_codes(x)
    assert_array_equal(np.max(np.abs(np.asarray(codes, np.int32)), axis=-1), 127)


def test_activation_row_max_is_reproduced_exactly():
    x = _rows_of_varied_scale()
    row_max = np.max(np.abs(np.asarray(x)), axis=-1)
    row_max_q = np.max(np.abs(np.asarray(quant.quantize_activations(x))), axis=-1)
    assert_array_equal(row_max_q, row_max)
    # a row where 127 / (127 / absmax) is 1 ulp off in fp32
    x = jnp.asarray([[0.3, -0.1, 0.04]], jnp.float32)
    assert float(quant.quantize_activations(x)[0, 0]) == float(x[0, 0])


@pytest.mark.parametrize("row", [
    [-1000.0, 1.0, 2.0, 3.0],
    [-3.0, 3.0, -1.5, 0.0],
    [-5.0, -4.99999, -2.5, -0.01],
    [-1e-3, 2e-4, -3e-4, 5e-4],
])
def test_activation_codes_never_reach_minus_128(row):
    x = jnp.asarray([row], jnp.float32)
    codes, _ = quant.int8_codes(x)
    codes = np.asarray(codes, np.int32)
    assert codes.min() >= -127
    assert codes[0, int(np.argmax(np.abs(row)))] == int(np.sign(row[np.argmax(np.abs(row))])) * 127


def test_activation_codes_never_reach_minus_128_on_random_rows():
    x = _rows_of_varied_scale(seed=7) - 3.0  # skewed negative: many rows have negative absmax
    codes, _ = quant.int8_codes(x)
    assert int(np.min(np.asarray(codes, np.int32))) == -127


def test_activation_quantization_codes_are_idempotent():
    x = _rows_of_varied_scale(seed=8)
    x_q = quant.quantize_activations(x)
    assert_array_equal(np.asarray(quant.int8_codes(x_q)[0]), np.asarray(quant.int8_codes(x)[0]))


def test_activation_quantization_is_idempotent():
    x = _rows_of_varied_scale(seed=8)
    x_q = quant.quantize_activations(x)
    assert_array_equal(np.asarray(quant.quantize_activations(x_q)), np.asarray(x_q))


def test_ternary_codes_are_stable_under_requantization():
    w_q = quant.quantize_weights(_gaussian((64, 48), seed=9))
    # mean|W_q| = g * (fraction of nonzeros) != g, but the codes must not change
    assert_array_equal(np.asarray(quant.ternary_codes(w_q)[0]),
                       np.asarray(quant.ternary_codes(_gaussian((64, 48), seed=9))[0]))


# --------------------------------------------------------------------------- zeros


def test_all_zero_inputs_do_not_produce_nan():
    z = jnp.zeros((4, 8), jnp.float32)
    for f in (quant.quantize_weights, quant.quantize_activations,
              quant.quantize_weights_ste, quant.quantize_activations_ste):
        out = np.asarray(f(z))
        assert_array_equal(out, np.zeros((4, 8), np.float32))
        grad = np.asarray(jax.grad(lambda v, f=f: jnp.sum(f(v)))(z))
        assert np.all(np.isfinite(grad))
    assert np.isfinite(float(quant.weight_scale(z)))
    codes, scale = quant.int8_codes(z)
    assert_array_equal(np.asarray(codes), 0)
    assert np.all(np.isfinite(np.asarray(scale)))


def test_zero_row_next_to_nonzero_rows_stays_zero():
    x = jnp.asarray([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], jnp.float32)
    x_q = np.asarray(quant.quantize_activations(x))
    assert_array_equal(x_q[0], 0.0)
    assert np.all(np.isfinite(x_q))


# --------------------------------------------------------------------------- STE


def test_ste_forward_equals_quantized_value():
    w = _gaussian((32, 24), seed=10)
    x = _rows_of_varied_scale(n=16, d=24, seed=10)
    assert_allclose(np.asarray(quant.quantize_weights_ste(w)),
                    np.asarray(quant.quantize_weights(w)), rtol=1e-6, atol=1e-7)
    assert_allclose(np.asarray(quant.quantize_activations_ste(x)),
                    np.asarray(quant.quantize_activations(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [quant.quantize_weights_ste, quant.quantize_activations_ste],
                         ids=["weights", "activations"])
def test_ste_gradient_is_identity(fn):
    v = _gaussian((16, 24), seed=11)
    c = _gaussian((16, 24), seed=12)
    grad = jax.grad(lambda u: jnp.sum(c * fn(u)))(v)
    assert_array_equal(np.asarray(grad), np.asarray(c))


@pytest.mark.parametrize("fn", [quant.quantize_weights_ste, quant.quantize_activations_ste],
                         ids=["weights", "activations"])
def test_ste_vjp_is_identity_for_nonlinear_downstream(fn):
    v = _gaussian((8, 12), seed=13)
    _, vjp = jax.vjp(fn, v)
    cot = _gaussian((8, 12), seed=14)
    assert_array_equal(np.asarray(vjp(cot)[0]), np.asarray(cot))

