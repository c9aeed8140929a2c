"""8-bit optimizer states: blockwise int8 codes + fp32 absmax, as an optax wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from nanochat_jax.optim.memory import tree_bytes
from nanochat_jax.optim.quantized import (
    QuantizedArray,
    create_dynamic_map,
    dequantize,
    dequantize_tree,
    quantize,
    quantize_states,
)

BLOCK = 256


def _blocks(x, block_size=BLOCK):
    """x flattened and zero-padded to [n_blocks, block_size] (the layout `quantize` uses)."""
    flat = np.ravel(np.asarray(x, np.float32))
    return np.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)


def _varied_scales(shape=(37, 100), seed=0):
    """Gaussian data whose blocks span six orders of magnitude (as optimizer moments do)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return x * np.float32(10.0) ** rng.uniform(-6, 0, size=shape).astype(np.float32)


def _step_fn(tx, loss):
    """One jitted (params, state) -> (params, state, loss) optimizer step."""
    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value
    return step


def _quadratic_loss(params):
    return sum(jnp.sum((p - 1.0) ** 2) for p in jax.tree.leaves(params))


def _n_quantized(state) -> int:
    return sum(isinstance(x, QuantizedArray)
               for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedArray)))


# --- the blockwise map ---------------------------------------------------------------------------

def test_linear_error_is_at_most_half_a_step_per_block():
    x = _varied_scales()
    q = quantize(jnp.asarray(x), BLOCK)
    err = np.abs(_blocks(x) - _blocks(dequantize(q)))  # [n_blocks, BLOCK]
    absmax = np.abs(_blocks(x)).max(axis=1, keepdims=True)
    assert_array_equal(np.asarray(q.absmax), absmax[:, 0])
    assert np.all(err <= absmax / 254 * (1 + 1e-6))


@pytest.mark.parametrize("dynamic", [False, True])
def test_block_max_reconstructs_exactly(dynamic):
    # The dynamic map's largest value is +1 (its most negative is -0.993), so for it the max
    # |element| of each block is made positive; the linear map is symmetric.
    x = _blocks(_varied_scales(seed=1))  # [n_blocks, BLOCK]
    rows, cols = np.arange(x.shape[0]), np.abs(x).argmax(axis=1)
    if dynamic:
        x[rows, cols] = np.abs(x[rows, cols])
    assert np.any(x[rows, cols] < 0) != dynamic
    x_hat = np.asarray(dequantize(quantize(jnp.asarray(x), BLOCK, dynamic)))
    assert_array_equal(x_hat[rows, cols], x[rows, cols])


@pytest.mark.parametrize("dynamic", [False, True])
def test_zeros_are_preserved(dynamic):
    x = _varied_scales(seed=2)
    x[np.random.default_rng(2).random(x.shape) < 0.3] = 0.0
    x_hat = np.asarray(dequantize(quantize(jnp.asarray(x), BLOCK, dynamic)))
    assert np.count_nonzero(x == 0) > 0
    assert_array_equal(x_hat[x == 0], 0.0)


@pytest.mark.parametrize("dynamic", [False, True])
def test_all_zero_block_decodes_to_zeros_without_nan(dynamic):
    x = np.ones((3, BLOCK), np.float32)
    x[1] = 0.0
    with jax.debug_nans(True):  # raises on any 0/0 inside quantize or dequantize
        q = quantize(jnp.asarray(x), BLOCK, dynamic)
        x_hat = np.asarray(dequantize(q))
    assert float(q.absmax[1]) == 0.0
    assert np.all(np.isfinite(x_hat))
    assert_array_equal(x_hat[1], 0.0)
    assert_array_equal(x_hat[[0, 2]], 1.0)


@pytest.mark.parametrize("shape", [(3, 100), (7,), (2, 3, 129)])
def test_padding_when_size_is_not_a_multiple_of_block_size(shape):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    q = quantize(jnp.asarray(x), BLOCK)
    n_blocks = -(-x.size // BLOCK)
    assert q.codes.shape == (n_blocks, BLOCK) and q.codes.dtype == jnp.int8
    assert q.absmax.shape == (n_blocks,) and q.absmax.dtype == jnp.float32
    assert_array_equal(np.asarray(q.codes).reshape(-1)[x.size:], 0)  # the padding encodes to 0
    x_hat = dequantize(q)
    assert x_hat.shape == shape
    assert_allclose(np.asarray(x_hat), x, atol=float(np.abs(x).max()) / 254 * (1 + 1e-6))


def test_dequantize_restores_the_original_dtype():
    x = jnp.linspace(-1.0, 1.0, 1000, dtype=jnp.bfloat16).reshape(10, 100)
    assert dequantize(quantize(x, BLOCK)).dtype == jnp.bfloat16


def test_dynamic_map_is_256_sorted_signed_values_with_one_zero_and_max_one():
    table = create_dynamic_map()
    assert table.shape == (256,) and table.dtype == np.float32
    assert np.all(np.diff(table) > 0)
    assert np.count_nonzero(table == 0) == 1 and table[-1] == 1.0
    assert np.count_nonzero(table < 0) == 127 and -1.0 < table[0] < -0.99
    assert 0 < table[table > 0].min() < 1e-6  # fine resolution near zero (7 decades)


def test_dynamic_map_encodes_to_the_nearest_value():
    table = create_dynamic_map()
    x = _varied_scales(seed=4)
    q = quantize(jnp.asarray(x), BLOCK, dynamic=True)
    normed = _blocks(x) / np.asarray(q.absmax)[:, None]  # [n_blocks, BLOCK] in [-1, 1]
    chosen = table[np.asarray(q.codes).astype(np.int32) + 128]
    best = np.abs(normed[..., None] - table).min(axis=-1)
    assert_allclose(np.abs(normed - chosen), best, atol=1e-7)


def test_dynamic_map_error_is_relative_for_small_values():
    # The point of the dynamic map: a value 1000x below its block's max keeps ~10% accuracy,
    # while the linear map rounds it to zero.
    x = np.full(BLOCK, 1e-3, np.float32)
    x[0] = 1.0
    linear = np.asarray(dequantize(quantize(jnp.asarray(x), BLOCK)))
    dyn = np.asarray(dequantize(quantize(jnp.asarray(x), BLOCK, dynamic=True)))
    assert_array_equal(linear[1:], 0.0)
    assert_allclose(dyn[1:], 1e-3, rtol=0.1)


# --- the optax wrapper ---------------------------------------------------------------------------

def test_small_float_leaves_and_integer_counts_stay_unquantized():
    params = {"big": jnp.zeros((64, 64)), "small": jnp.zeros(10)}
    state = quantize_states(optax.adam(1e-3), min_size=4096).init(params)
    adam = state[0]
    assert isinstance(adam.mu["big"], QuantizedArray) and isinstance(adam.nu["big"], QuantizedArray)
    assert adam.mu["small"].dtype == jnp.float32 and adam.mu["small"].shape == (10,)
    assert adam.count.dtype == jnp.int32 and adam.count.shape == ()
    assert _n_quantized(state) == 2


def test_quantized_adam_state_bytes_match_the_formula():
    # fp32 Adam: 2 moments x 4 bytes/param. 8-bit: 2 moments x (1 byte/param + 4 bytes per
    # block of 256) = 2.03125 bytes/param. Both carry one int32 step count.
    n = 1024 * 1024
    params = {"w": jnp.zeros((1024, 1024))}
    fp32 = jax.jit(optax.adam(1e-3).init)(params)
    q8 = jax.jit(quantize_states(optax.adam(1e-3)).init)(params)
    assert tree_bytes(fp32) == 2 * 4 * n + 4
    assert tree_bytes(q8) == 2 * (n + 4 * n // BLOCK) + 4
    assert tree_bytes(q8) / n == pytest.approx(2.03125, abs=1e-5)
    assert tree_bytes(jax.eval_shape(quantize_states(optax.adam(1e-3)).init, params)) \
        == tree_bytes(q8)


def test_update_is_inner_update_on_the_dequantized_state():
    params = {"w": jnp.asarray(_varied_scales((64, 96), seed=5))}
    grads = {"w": jnp.asarray(_varied_scales((64, 96), seed=6))}
    inner = optax.adam(1e-2)
    tx = quantize_states(inner)
    _, state = tx.update(grads, tx.init(params), params)  # a non-trivial quantized state
    updates, new_state = tx.update(grads, state, params)
    ref_updates, ref_state = inner.update(grads, dequantize_tree(state), params)
    assert_allclose(np.asarray(updates["w"]), np.asarray(ref_updates["w"]), rtol=1e-6)
    assert_array_equal(np.asarray(new_state[0].mu["w"].codes),
                       np.asarray(quantize(ref_state[0].mu["w"], BLOCK).codes))


def test_wrapper_works_inside_chain_under_jit():
    params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), quantize_states(optax.adam(0.1)))
    step = _step_fn(tx, _quadratic_loss)
    state = tx.init(params)
    new_params, state, _ = step(params, state)
    new_params, state, _ = step(new_params, state)
    assert _n_quantized(state) == 2
    assert float(_quadratic_loss(new_params)) < float(_quadratic_loss(params))


def test_wrapper_works_inside_multisteps():
    params = {"w": jnp.zeros((64, 64))}
    tx = optax.MultiSteps(quantize_states(optax.adam(0.1)), every_k_schedule=2)
    step = _step_fn(tx, _quadratic_loss)
    p1, state, _ = step(params, tx.init(params))
    assert_array_equal(np.asarray(p1["w"]), 0.0)  # first micro-step only accumulates
    p2, state, _ = step(p1, state)
    assert np.all(np.asarray(p2["w"]) > 0)  # second applies the averaged update
    assert _n_quantized(state.inner_opt_state) == 2


def test_wrapper_works_around_inject_hyperparams():
    params = {"w": jnp.zeros((64, 64))}
    tx = quantize_states(optax.inject_hyperparams(optax.adam)(learning_rate=0.1))
    step = _step_fn(tx, _quadratic_loss)
    state = tx.init(params)
    new_params, state, _ = step(params, state)
    assert_allclose(float(state.hyperparams["learning_rate"]), 0.1)
    assert _n_quantized(state.inner_state) == 2
    assert_allclose(np.asarray(new_params["w"]), 0.1, rtol=1e-5)  # Adam's first step is lr*sign


@pytest.mark.parametrize("dynamic", [False, True])
def test_orbax_round_trip_of_quantized_muon_state(tmp_path, dynamic):
    params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}
    tx = quantize_states(optax.contrib.muon(0.02), min_size=1024, dynamic=dynamic)
    step = _step_fn(tx, _quadratic_loss)
    _, state, _ = step(params, tx.init(params))  # non-zero momentum
    assert _n_quantized(state) == 1
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "opt_state", state)
        ckptr.wait_until_finished()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = ckptr.restore(tmp_path / "opt_state", target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.dtype == want.dtype
        assert_array_equal(np.asarray(got), np.asarray(want))


def test_8bit_muon_tracks_fp32_muon():
    # Least squares Y = X W* + b*: W [64, 64] goes to Muon (its 4096-element momentum is
    # quantized with min_size=1024), the bias to Muon's Adam branch (64 elements, stays fp32).
    k_x, k_w, k_b = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k_x, (256, 64))  # [N, D_in]
    y = x @ (jax.random.normal(k_w, (64, 64)) / 8) + jax.random.normal(k_b, (1, 64))  # [N, D_out]

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)

    params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}
    lr = optax.cosine_decay_schedule(0.02, 300)

    def train(tx):
        step = _step_fn(tx, loss)
        p, state = params, tx.init(params)
        for _ in range(300):
            p, state, _ = step(p, state)
        return float(loss(p)), state

    fp32_loss, _ = train(optax.contrib.muon(lr))
    q8_loss, q8_state = train(quantize_states(optax.contrib.muon(lr), min_size=1024))
    assert _n_quantized(q8_state) == 1
    initial = float(loss(params))
    assert fp32_loss < initial / 100 and q8_loss < initial / 100
    assert q8_loss == pytest.approx(fp32_loss, rel=0.05)
