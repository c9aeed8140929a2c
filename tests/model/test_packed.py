"""Inference from packed weights: no latent kernels, same outputs, <= 1/7 of bf16 memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.model.config import ModelConfig, model_config
from nanochat_jax.model.packed import pack_params, packed_bytes, ternary_weight_bytes
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary.packing import PackedTernary

# float32 activations on every platform ("auto" is bf16 on a GPU/TPU): the bounds below are
# fp32 rounding
CFG = ModelConfig(vocab_size=64, seq_len=16, d_model=64, n_layers=2, n_heads=4,
                  n_kv_heads=2, d_ff=96, compute_dtype="float32")


def _model_and_vars(backend="auto", **features):
    model = Transformer(dataclasses.replace(CFG, kernel_backend=backend, **features))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 16)), jnp.int32)
    return model, model.init(jax.random.PRNGKey(0), tokens), tokens


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_packed_forward_equals_the_latent_weight_forward(backend):
    model, variables, tokens = _model_and_vars(backend)
    np.testing.assert_allclose(np.asarray(model.apply(pack_params(variables), tokens)),
                               np.asarray(model.apply(variables, tokens)), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_packed_weights_run_every_architecture_feature():
    """MTP modules, the looped stack with its gate, and mHC maps: packed == latent."""
    model, variables, tokens = _model_and_vars("reference", mtp_depth=1, loops=2, mhc_streams=2)
    packed = pack_params(variables)
    assert "mtp_0" in packed["packed"] and "exit_gate" in packed["params"]
    for q in (None, 0.5):
        np.testing.assert_allclose(
            np.asarray(model.apply(packed, tokens, exit_threshold=q)),
            np.asarray(model.apply(variables, tokens, exit_threshold=q)), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_packed_forward_equals_fake_quant_forward_within_float_tolerance():
    """The int32 path and the fake-quant float path differ by float rounding; a 1-ulp
    difference can flip one int8 activation code in a later layer, so the bound is on the
    logit scale (1%) plus agreement of the predicted tokens, not a per-element rtol."""
    model, variables, tokens = _model_and_vars("reference")
    fake_quant, _, _ = _model_and_vars(ternary_product="fake_quant")
    expected = np.asarray(fake_quant.apply(variables, tokens))
    got = np.asarray(model.apply(pack_params(variables), tokens))
    assert np.max(np.abs(got - expected)) <= 1e-2 * np.max(np.abs(expected))
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.95
    assert np.median(np.abs(got - expected)) < 1e-6  # almost every logit agrees to float eps


def test_packed_variables_hold_no_latent_ternary_weights():
    _, variables, _ = _model_and_vars()
    packed = pack_params(variables)
    kernels = jax.tree.leaves(packed["packed"], is_leaf=lambda x: isinstance(x, PackedTernary))
    assert len(kernels) == CFG.n_layers * 7  # q, k, v, o, w1, w3, w2
    assert all(isinstance(k, PackedTernary) and k.codes.dtype == jnp.uint8 for k in kernels)
    names = ["/".join(str(getattr(p, "key", p)) for p in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(packed["params"])[0]]
    assert not any(n.endswith("kernel") for n in names)
    assert any(n.startswith("embed") for n in names) and "lm_head" in names


@pytest.mark.parametrize("preset", ["tiny", "125m"])
def test_packed_ternary_layers_take_at_most_a_seventh_of_bf16(preset):
    cfg = model_config(preset, vocab_size=384 if preset == "tiny" else 32768, seq_len=128)
    model = Transformer(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)  # no allocation
    packed = jax.eval_shape(pack_params, shapes)
    ratio = packed_bytes(packed) / ternary_weight_bytes(shapes)
    assert ratio <= 1 / 7, ratio
    assert ratio >= 1 / 8.01  # 2 bits vs 16 bits is the floor


def test_packed_weights_on_a_dense_model_are_refused_with_the_reason():
    """pack_params ternarises: applied to a dense model it would change the model, and Flax
    used to fail deep inside with ScopeParamNotFoundError."""
    from nanochat_jax.errors import ConfigError

    model, variables, tokens = _model_and_vars(ternary=False)
    with pytest.raises(ConfigError, match="packed ternary weights given to a dense model"):
        model.apply(pack_params(variables), tokens)
