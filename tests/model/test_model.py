"""BitLinear, rotary embeddings, attention and the Transformer, plus the model zoo."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.config import PRESETS, ModelConfig, model_config, resolve_compute_dtype
from nanochat_jax.model.layers import BitLinear, apply_rotary, rotary_tables
from nanochat_jax.model.transformer import Transformer, count_params
from nanochat_jax.ternary import quant

TINY = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   d_ff=64)


def _tokens(seed=0, batch=2, t=8, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, t)), jnp.int32)


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.cache
def _init(cfg, seed=0):
    """(model, params); cached per config (params are immutable), jitted to compile once."""
    model = Transformer(cfg)
    tokens = _tokens(t=cfg.seq_len, vocab=cfg.vocab_size)
    return model, jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)


@functools.cache
def _jitted_apply(cfg, method=None):
    model = Transformer(cfg)
    return jax.jit(lambda p, t: model.apply(p, t, method=method))


def _apply(model, params, tokens, method=None):
    """model.apply, compiled once per (config, method): cheaper than op-by-op on CPU."""
    return _jitted_apply(model.cfg, method)(params, tokens)


def _shapes(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): x.shape for p, x in flat}


# --------------------------------------------------------------------------- BitLinear


def _bitlinear(ternary, seed=0):
    layer = BitLinear(24, ternary=ternary, init_std=0.5)
    x = _normal((3, 5, 16), seed + 1)
    params = layer.init(jax.random.PRNGKey(seed), x)
    return layer, params, x


def test_bitlinear_ternary_equals_quantized_activations_times_quantized_weights():
    layer, params, x = _bitlinear(ternary=True)
    w = params["params"]["kernel"]
    chex.assert_shape(w, (16, 24))
    y = np.asarray(layer.apply(params, x))
    expected = np.asarray(quant.quantize_activations(x)) @ np.asarray(quant.quantize_weights(w))
    assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_bitlinear_ternary_equals_integer_matmul_rescaled():
    """Inference form of docs/techniques.md#bitnet: (int8(x) @ tern(W)) * g / s_x with exact int32
    accumulation.

    s_x = 127 / absmax per token.
    """
    layer, params, x = _bitlinear(ternary=True, seed=3)
    w = params["params"]["kernel"]
    x_codes, _ = quant.int8_codes(x)
    s_x = 127.0 / np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True)
    w_codes, g = quant.ternary_codes(w)
    acc = np.asarray(x_codes, np.int32) @ np.asarray(w_codes, np.int32)  # exact
    expected = acc * float(g) / s_x
    assert_allclose(np.asarray(layer.apply(params, x)), expected, rtol=1e-5, atol=1e-5)


def test_bitlinear_dense_equals_plain_matmul_exactly():
    layer, params, x = _bitlinear(ternary=False)
    w = params["params"]["kernel"]
    assert_array_equal(np.asarray(layer.apply(params, x)), np.asarray(jnp.dot(x, w)))


def test_bitlinear_ternary_differs_from_dense():
    layer, params, x = _bitlinear(ternary=True)
    dense = BitLinear(24, ternary=False, init_std=0.5)
    assert not np.allclose(np.asarray(layer.apply(params, x)),
                           np.asarray(dense.apply(params, x)), atol=1e-3)


def test_bitlinear_has_no_bias():
    _, params, _ = _bitlinear(ternary=True)
    assert list(params["params"]) == ["kernel"]


def test_bitlinear_kernel_gradient_is_straight_through():
    """d/dW sum(c * (x_q @ W_q)) = x_q^T c: the STE passes the gradient to the latent W."""
    layer, params, x = _bitlinear(ternary=True, seed=5)
    c = _normal((3, 5, 24), 9)
    grad = jax.grad(lambda p: jnp.sum(c * layer.apply(p, x)))(params)["params"]["kernel"]
    x_q = np.asarray(quant.quantize_activations(x)).reshape(-1, 16)
    assert_allclose(np.asarray(grad), x_q.T @ np.asarray(c).reshape(-1, 24), rtol=1e-4,
                    atol=1e-4)


# --------------------------------------------------------------------------- Transformer


def test_dense_twin_has_identical_param_tree():
    def shapes(cfg):
        return jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), _tokens())

    p_tern, p_dense = shapes(TINY), shapes(dataclasses.replace(TINY, ternary=False))
    assert _shapes(p_tern) == _shapes(p_dense)
    assert jax.tree.structure(p_tern) == jax.tree.structure(p_dense)
    assert len(_shapes(p_tern)) == 3 + 11 * TINY.n_layers


def test_dense_twin_gives_different_outputs_from_same_params():
    model, params = _init(TINY)
    dense = Transformer(dataclasses.replace(TINY, ternary=False))
    tokens = _tokens(1)
    logits_t = np.asarray(_apply(model, params, tokens))
    logits_d = np.asarray(_apply(dense, params, tokens))
    chex.assert_shape([logits_t, logits_d], (2, 8, 64))
    assert np.all(np.isfinite(logits_t)) and np.all(np.isfinite(logits_d))
    assert not np.allclose(logits_t, logits_d, atol=1e-4)


@pytest.mark.parametrize("ternary", [True, False])
def test_attention_is_causal(ternary):
    cfg = dataclasses.replace(TINY, ternary=ternary)
    model, params = Transformer(cfg), _init(TINY)[1]  # the dense twin shares the param tree
    tokens = _tokens(2)
    base = np.asarray(_apply(model, params, tokens))
    for t in (0, 3, 7):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
        out = np.asarray(_apply(model, params, changed))
        assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not np.allclose(out[:, t], base[:, t], atol=1e-6)


def test_block_params_have_the_bitnet_layout():
    _, params = _init(TINY)
    p = params["params"]
    assert set(p) == {"embed", "final_norm", "lm_head", "block_0", "block_1"}
    block = p["block_0"]
    assert set(block) == {"attn", "attn_norm", "ffn", "ffn_norm"}
    assert set(block["attn"]) == {"q", "k", "v", "o", "attn_sub_norm"}
    assert set(block["ffn"]) == {"w1", "w2", "w3", "ffn_sub_norm"}
    chex.assert_shape(block["ffn"]["w1"]["kernel"], (32, 64))
    chex.assert_shape(block["ffn"]["w2"]["kernel"], (64, 32))
    chex.assert_shape(block["ffn"]["ffn_sub_norm"]["scale"], (64,))


def test_grouped_query_attention_kv_kernels_have_n_kv_heads_outputs():
    _, params = _init(TINY)
    attn = params["params"]["block_0"]["attn"]
    head_dim = TINY.d_model // TINY.n_heads
    chex.assert_shape(attn["q"]["kernel"], (32, TINY.n_heads * head_dim))
    chex.assert_shape(attn["k"]["kernel"], (32, TINY.n_kv_heads * head_dim))
    chex.assert_shape(attn["v"]["kernel"], (32, TINY.n_kv_heads * head_dim))
    chex.assert_shape(attn["o"]["kernel"], (TINY.n_heads * head_dim, 32))


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    """GQA: query head n reads kv head n // (n_heads / n_kv_heads)."""
    n_kv_heads = TINY.n_kv_heads
    assert n_kv_heads < TINY.n_heads
    gqa_cfg = dataclasses.replace(TINY, n_kv_heads=n_kv_heads, ternary=False)
    mha_cfg = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads, ternary=False)
    gqa, params = Transformer(gqa_cfg), _init(TINY)[1]
    group = TINY.n_heads // n_kv_heads
    head_dim = TINY.d_model // TINY.n_heads

    def repeat_heads(kernel):  # [D, K*H] -> [D, N*H]
        d = kernel.shape[0]
        return jnp.repeat(kernel.reshape(d, n_kv_heads, head_dim), group, axis=1).reshape(d, -1)

    mha_params = jax.tree_util.tree_map_with_path(
        lambda path, x: repeat_heads(x)
        if any(getattr(k, "key", None) in ("k", "v") for k in path) else x, params)
    tokens = _tokens(3)
    out_gqa = np.asarray(_apply(gqa, params, tokens))
    out_mha = np.asarray(_apply(Transformer(mha_cfg), mha_params, tokens))
    assert np.all(np.isfinite(out_gqa))
    assert_allclose(out_gqa, out_mha, rtol=1e-5, atol=1e-5)


def _hidden_head_and_logits(module, tokens):
    return module.hidden_and_head(tokens), module(tokens)


def test_tied_embeddings_have_no_lm_head_and_use_embedding_transpose():
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), _tokens())
    assert "lm_head" not in shapes["params"]
    _, untied = _init(TINY)
    params = {"params": {k: v for k, v in untied["params"].items() if k != "lm_head"}}
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    (hidden, head), logits = _apply(Transformer(cfg), params, _tokens(4),
                                    method=_hidden_head_and_logits)
    embedding = np.asarray(params["params"]["embed"]["embedding"])
    assert_array_equal(np.asarray(head), embedding.T)
    assert_allclose(np.asarray(logits), np.asarray(hidden) @ embedding.T, rtol=1e-5, atol=1e-6)


def test_untied_logits_use_lm_head():
    model, params = _init(TINY)
    (hidden, head), logits = _apply(model, params, _tokens(5), method=_hidden_head_and_logits)
    lm_head = np.asarray(params["params"]["lm_head"])
    chex.assert_shape(lm_head, (32, 64))
    assert_array_equal(np.asarray(head), lm_head)
    assert_allclose(np.asarray(logits), np.asarray(hidden) @ lm_head, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- rotary


def _rotate(x, pos, head_dim=16, theta=500_000.0):
    """x: [H] at integer position pos -> rotated [H]."""
    cos, sin = rotary_tables(jnp.asarray([pos]), head_dim, theta)
    return apply_rotary(x[None, None, None, :], cos, sin)[0, 0, 0]


def test_rotary_preserves_per_pair_norms():
    head_dim = 16
    x = _normal((2, 6, 3, head_dim), 0)
    cos, sin = rotary_tables(jnp.arange(6) * 37, head_dim, 10_000.0)
    y = apply_rotary(x, cos, sin)
    half = head_dim // 2

    def pair_norm(a):
        return np.hypot(np.asarray(a[..., :half]), np.asarray(a[..., half:]))

    assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(y), np.asarray(x), atol=1e-3)


def test_rotary_at_position_zero_is_identity():
    x = _normal((16,), 1)
    assert_allclose(np.asarray(_rotate(x, 0)), np.asarray(x), rtol=0, atol=1e-7)


def test_rotary_dot_product_depends_only_on_relative_position():
    q, k = _normal((16,), 2), _normal((16,), 3)

    def dot(m, n):
        return float(jnp.dot(_rotate(q, m, theta=100.0), _rotate(k, n, theta=100.0)))

    for offset in (0, 1, 3, 7):
        ref = dot(offset, 0)
        for n in (1, 5, 20):
            assert_allclose(dot(n + offset, n), ref, rtol=1e-4, atol=1e-4)
    assert abs(dot(3, 0) - dot(0, 0)) > 1e-3  # and it does depend on the offset


# --------------------------------------------------------------------------- config / zoo


def test_model_config_unknown_preset_names_the_options():
    with pytest.raises(ConfigError) as err:
        model_config("13b")
    message = str(err.value)
    assert "13b" in message
    for name in PRESETS:
        assert name in message


def test_model_config_unknown_field_names_the_fields():
    with pytest.raises(ConfigError) as err:
        model_config("tiny", d_modle=64)
    message = str(err.value)
    assert "d_modle" in message
    for field in ("d_model", "n_layers", "vocab_size"):
        assert field in message


def test_presets_hold_the_architecture_only_and_model_config_asks_for_the_rest():
    """The vocabulary is the tokenizer's and the sequence length the run's: one value in one
    place, so no preset carries them and model_config refuses a call without them."""
    assert all(not set(fields) & {"vocab_size", "seq_len"} for fields in PRESETS.values())
    with pytest.raises(ConfigError, match="needs vocab_size and seq_len"):
        model_config("125m")
    with pytest.raises(ConfigError, match="needs seq_len"):
        model_config("125m", vocab_size=32768)
    assert model_config("125m", vocab_size=1000, seq_len=64).vocab_size == 1000


def test_model_config_overrides_apply_and_none_keeps_preset():
    cfg = model_config("tiny", vocab_size=384, seq_len=128, d_model=64, n_layers=None)
    assert cfg.d_model == 64
    assert cfg.n_layers == PRESETS["tiny"]["n_layers"]


@pytest.mark.parametrize("fields", [
    dict(d_model=30),  # not divisible by n_heads=4
    dict(n_kv_heads=3),  # n_heads=4 is not a multiple of it
    dict(vocab_size=0),
    dict(d_model=20),  # head dim 5 is odd: cannot rotate pairs
    dict(ffn_activation="gelu"),  # relu2 or silu only
])
def test_model_config_rejects_bad_geometry(fields):
    with pytest.raises(ConfigError):
        dataclasses.replace(TINY, **fields)


@pytest.mark.parametrize("activation,act", [("relu2", lambda g: jnp.square(jax.nn.relu(g))),
                                             ("silu", jax.nn.silu)])
def test_ffn_is_down_of_sub_normed_activation_of_gate_times_up(activation, act):
    from nanochat_jax.model.layers import FeedForward

    cfg = dataclasses.replace(TINY, ternary=False, ffn_activation=activation)
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))
    ffn = FeedForward(cfg)
    params = ffn.init(jax.random.key(0), x)["params"]
    out, _ = ffn.apply({"params": params}, x)
    h = act(x @ params["w1"]["kernel"]) * (x @ params["w3"]["kernel"])
    h = h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.norm_eps)
    want = (h * params["ffn_sub_norm"]["scale"][None, None, :]) @ params["w2"]["kernel"]
    assert_allclose(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("features", [{}, dict(loops=2, mhc_streams=2, mtp_depth=1),
                                      dict(tie_embeddings=True, mtp_depth=2,
                                           mtp_kind="parallel")])
def test_count_params_for_tiny_preset_matches_model_init(features):
    """count_params counts on the scanned twin: the unrolled model's own init agrees."""
    cfg = model_config("tiny", vocab_size=384, seq_len=128, **features)
    model = Transformer(cfg)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    actual = sum(int(x.size) for x in jax.tree.leaves(params))
    counts = count_params(cfg)
    assert counts["total"] == actual
    embed = sum(x.size for name in ("embed", "lm_head") if name in params["params"]
                for x in jax.tree.leaves(params["params"][name]))
    assert counts["embedding"] == embed
    assert counts["non_embedding"] == actual - embed


def test_count_params_for_tiny_preset_matches_the_architecture():
    c = model_config("tiny", vocab_size=384, seq_len=128)
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_block = (2 * c.d_model  # attn_norm, ffn_norm
                 + c.d_model * q_out + 2 * c.d_model * kv_out + q_out * c.d_model  # q, k, v, o
                 + q_out  # attn_sub_norm
                 + 3 * c.d_model * c.d_ff + c.d_ff)  # w1, w3, w2, ffn_sub_norm
    embedding = 2 * c.vocab_size * c.d_model  # embed + untied lm_head
    expected = embedding + c.n_layers * per_block + c.d_model  # + final_norm
    counts = count_params(c)
    assert counts == {"total": expected, "embedding": embedding,
                      "non_embedding": expected - embedding}
    tied = count_params(dataclasses.replace(c, tie_embeddings=True))
    assert tied["total"] == expected - c.vocab_size * c.d_model


@pytest.fixture(scope="module")
def preset_counts():
    """count_params of every preset (jax.eval_shape: shapes only, nothing allocated)."""
    return {name: count_params(model_config(name, vocab_size=32768, seq_len=2048))
            for name in PRESETS}


@pytest.mark.slow
def test_every_preset_builds_and_sizes_increase(preset_counts):
    totals = {}
    for name, counts in preset_counts.items():
        assert counts["total"] > counts["non_embedding"] > 0
        totals[name] = counts["total"]
    order = ["125m", "350m", "1b", "3b", "7b"]
    sizes = [totals[n] for n in order]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), totals


@pytest.mark.slow
def test_presets_are_roughly_their_nominal_size(preset_counts):
    nominal = {"125m": 125e6, "350m": 350e6, "1b": 1e9, "3b": 3e9, "7b": 7e9}
    for name, n in nominal.items():
        total = preset_counts[name]["total"]
        assert 0.6 * n < total < 1.6 * n, (name, total)


def test_auto_compute_dtype_is_bf16_where_compiled_for_a_gpu_or_tpu_and_fp32_on_a_cpu():
    """The default follows the platform the model is compiled for (the mesh in context,
    else the default backend): a CPU mesh traces float32 activations; a named dtype is kept
    everywhere."""
    assert resolve_compute_dtype("auto", "tpu") == resolve_compute_dtype("auto", "gpu") == \
        "bfloat16"
    assert resolve_compute_dtype("auto", "cpu") == "float32"
    assert resolve_compute_dtype("float32", "tpu") == "float32"
    cfg = model_config("tiny", vocab_size=64, seq_len=16, n_layers=1)
    assert cfg.compute_dtype == "auto"
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    cpu = jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))
    with jax.set_mesh(cpu):
        traced = str(jax.make_jaxpr(model.apply)(params, tokens))
    assert "bf16" not in traced
