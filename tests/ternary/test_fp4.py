"""FP4 (docs/techniques.md#fp4): values land on the E2M1 grid with one scale per block, stochastic
rounding is unbiased, the Hadamard rotation is orthogonal, and `fp4_dot` has an exact
forward and an FP4 backward that the model reaches through `model.fp4_backward`."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary import fp4

X = jax.random.normal(jax.random.key(0), (8, 96)) * 3.0


def _codes(q, fmt, no_clip=False):
    """The E2M1 values a quantised x holds: q / its block scale."""
    scale, _ = fp4.block_scales(X, fmt, no_clip)
    blocks = fp4._blocks(q, fp4.BLOCK[fmt])[0]
    return np.asarray(blocks / scale)


def test_e2m1_rounds_to_nearest_even_and_saturates():
    x = jnp.array([0.2, 0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0, -7.0, -0.3])
    want = [0.0, 0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, -6.0, -0.5]
    np.testing.assert_array_equal(fp4.round_e2m1(x), want)


@pytest.mark.parametrize("fmt", fp4.FORMATS)
def test_values_are_grid_points_times_one_scale_per_block(fmt):
    q = fp4.quantize(X, fmt)
    codes = _codes(q, fmt)
    assert set(np.unique(np.abs(codes).round(6))) <= set(fp4.E2M1_GRID)
    scale, blocks = fp4.block_scales(X, fmt)
    assert blocks.shape[-1] == {"nvfp4": 16, "mxfp4": 32}[fmt]
    chex.assert_shape(scale, (8, 96 // fp4.BLOCK[fmt], 1))
    if fmt == "mxfp4":  # E8M0: powers of two
        np.testing.assert_array_equal(np.log2(scale), np.round(np.log2(scale)))
    else:  # E4M3 block scale times the fp32 tensor scale 448 * 6 / amax
        s_enc = fp4.E2M1_MAX * fp4.E4M3_MAX / float(jnp.max(jnp.abs(X)))
        e4m3 = np.asarray(scale) * s_enc
        np.testing.assert_allclose(e4m3, e4m3.astype(jnp.float8_e4m3fn).astype(np.float32),
                                   rtol=1e-6)
    rel = float(jnp.mean(jnp.abs(q - X)) / jnp.mean(jnp.abs(X)))
    assert rel < 0.15, rel  # ~0.09 / ~0.10 measured


@pytest.mark.parametrize("fmt", fp4.FORMATS)
def test_stochastic_rounding_is_on_the_grid_and_unbiased(fmt):
    n = 4000
    samples = jax.vmap(lambda k: fp4.quantize(X, fmt, k))(jax.random.split(jax.random.key(1), n))
    codes = np.stack([_codes(s, fmt, no_clip=True) for s in samples[:5]])
    assert set(np.unique(np.abs(codes).round(6))) <= set(fp4.E2M1_GRID)
    scale, _ = fp4.block_scales(X, fmt, no_clip=True)
    gap = 2.0 * np.repeat(np.asarray(scale)[..., 0], fp4.BLOCK[fmt], axis=-1)  # widest gap
    # each sample is x's lower or upper neighbour: std <= gap / 2; 5 sigma of the mean
    bias = np.abs(np.asarray(jnp.mean(samples, 0) - X))
    assert (bias <= 5 * (gap / 2) / np.sqrt(n)).all(), bias.max()
    assert len(np.unique(np.asarray(samples[:, 0, 0]))) == 2  # it does round both ways


@pytest.mark.slow
def test_an_all_zero_block_stays_zero():
    x = jnp.zeros((2, 64)).at[1, 40].set(3.0)
    for fmt in fp4.FORMATS:
        for key in (None, jax.random.key(0)):
            q = fp4.quantize(x, fmt, key)
            assert np.isfinite(np.asarray(q)).all() and float(jnp.abs(q[0]).max()) == 0.0


def test_random_hadamard_is_orthogonal_and_keeps_products():
    h = fp4.random_hadamard(jax.random.key(3))
    np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-6)
    x, g = jax.random.normal(jax.random.key(4), (40, 8)), jax.random.normal(
        jax.random.key(5), (40, 6))
    np.testing.assert_allclose(fp4._rotate_rows(x, h).T @ fp4._rotate_rows(g, h), x.T @ g,
                               atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        fp4.random_hadamard(jax.random.key(0), 12)


@pytest.mark.parametrize("hadamard", [False, True])
def test_fp4_dot_has_an_exact_forward_and_an_fp4_backward(hadamard):
    w = jax.random.normal(jax.random.key(6), (96, 40)) * 0.1

    def exact(x, w):
        return jnp.sum(jnp.sin(x @ w))

    def low(x, w, k):
        return jnp.sum(jnp.sin(fp4.fp4_dot(x, w, k, "nvfp4", hadamard)))

    assert float(low(X, w, jax.random.key(7))) == float(exact(X, w))
    want = jax.grad(exact, (0, 1))(X, w)
    got = jax.jit(jax.grad(low, (0, 1)))(X, w, jax.random.key(7))
    other = jax.jit(jax.grad(low, (0, 1)))(X, w, jax.random.key(8))
    for a, b, c in zip(got, want, other, strict=True):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert 0.01 < rel < 0.3, rel  # FP4 noise, not a different gradient (~0.16 measured)
        assert not np.array_equal(a, c)  # stochastic rounding: another key, another rounding


def _grads(cfg, tokens):
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), tokens[:, :-1])["params"]

    def loss(p):
        from nanochat_jax.losses import chunked_cross_entropy

        h, head = model.apply({"params": p}, tokens[:, :-1], method=Transformer.hidden_and_head,
                              rngs={"fp4": jax.random.key(1)})
        return chunked_cross_entropy(h, head, tokens[:, 1:], fp4=cfg.fp4_head_backward,
                                     key=jax.random.key(2)).loss

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
@pytest.mark.parametrize("ternary", [True, False])
def test_model_fp4_backward_changes_gradients_not_the_loss(ternary):
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, 384)
    cfg = model_config("tiny", vocab_size=384, seq_len=128, n_layers=2, ternary=ternary)
    (loss, grads), (loss4, grads4) = (_grads(c, tokens) for c in (
        cfg, dataclasses.replace(cfg, fp4_backward="nvfp4", fp4_hadamard=True,
                                 fp4_head=True)))
    assert float(loss4) == pytest.approx(float(loss), rel=1e-6)

    def rel(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    assert 0.01 < rel(grads4["lm_head"], grads["lm_head"]) < 0.3  # the head: FP4 always
    q, q4 = grads["block_0"]["attn"]["q"]["kernel"], grads4["block_0"]["attn"]["q"]["kernel"]
    if ternary:  # ternary layers keep their own straight-through backward; only the FP4
        assert rel(q4, q) < 0.3  # noise arriving from the head reaches them
    else:
        assert 0.01 < rel(q4, q) < 0.5


def test_an_unknown_fp4_format_is_refused():
    with pytest.raises(ConfigError, match="unknown model.fp4_backward 'fp8'"):
        model_config("tiny", vocab_size=384, seq_len=128, fp4_backward="fp8")


def test_nvfp4_scales_rounded_up_reach_every_value_even_below_the_normal_range():
    """A block 1e-5 the tensor's max has an E4M3 block scale below 2^-6 (subnormal). Rounded
    up for stochastic rounding, the scale must be the next E4M3 value, so no value lands
    past 6: a normal-range step (2^(e-3)) is too small there, and the block's max used to
    come out ~12% low on average."""
    x = jnp.concatenate([jnp.full((16,), 1000.0),
                         jnp.linspace(0.003, 0.0117, 16)])[None]  # block 2: ~1e-5 of amax
    scale, blocks = fp4.block_scales(x, "nvfp4", no_clip=True)
    s_enc = fp4.E2M1_MAX * fp4.E4M3_MAX / 1000.0
    s_dec = np.asarray(scale * s_enc).ravel()
    assert s_dec[1] < 2.0**-6  # the case: a subnormal E4M3 scale
    assert np.array_equal(s_dec, np.asarray(
        jnp.asarray(s_dec).astype(jnp.float8_e4m3fn).astype(jnp.float32)))  # representable
    assert float(jnp.max(jnp.abs(blocks / scale))) <= fp4.E2M1_MAX
    keys = jax.random.split(jax.random.key(3), 400)
    means = jnp.mean(jax.vmap(lambda k: fp4.quantize(x, "nvfp4", k))(keys), axis=0)
    np.testing.assert_allclose(float(means[0, -1]), float(x[0, -1]), rtol=0.03)  # unbiased
    assert float(fp4.next_e4m3(jnp.zeros(()))) == 2.0**-9


@pytest.mark.parametrize("power", [13, 15])
def test_mxfp4_scales_are_exact_at_powers_of_two(power):
    """float32 log2(8192) rounds to 12.999999: the block scale came out one binade low and
    8192 saturated to 6144 (32768 to 24576)."""
    x = jnp.full((1, 32), 2.0**power)
    np.testing.assert_array_equal(fp4.quantize(x, "mxfp4"), x)
    assert int(fp4.floor_log2(jnp.asarray(2.0**power))) == power


def test_fp4_on_a_ternary_model_reaches_only_the_head_and_only_when_asked():
    with pytest.raises(ConfigError, match="only non-ternary matmul is the LM head"):
        model_config("tiny", vocab_size=384, seq_len=128, fp4_backward="nvfp4")
    cfg = model_config("tiny", vocab_size=384, seq_len=128, fp4_backward="nvfp4", fp4_head=True)
    assert cfg.fp4_head_backward is not None
    dense = model_config("tiny", vocab_size=384, seq_len=128, ternary=False, fp4_backward="nvfp4")
    assert dense.fp4 is not None and dense.fp4_head_backward is None  # the head stays exact
    with pytest.raises(ConfigError, match="fp4_head=True needs model.fp4_backward"):
        model_config("tiny", vocab_size=384, seq_len=128, fp4_head=True)


@pytest.mark.slow
def test_an_fp4_backward_without_a_rounding_key_is_refused_the_forward_is_not():
    """No "fp4" rng used to mean jax.random.key(0) on every step: the same draws forever."""
    from nanochat_jax.losses import chunked_cross_entropy

    cfg = model_config("tiny", vocab_size=384, seq_len=128, n_layers=1, ternary=False,
                       fp4_backward="nvfp4")
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 384)
    params = model.init(jax.random.key(0), tokens[:, :-1])
    model.apply(params, tokens[:, :-1])  # inference: fine without a key
    with pytest.raises(ConfigError, match="needs a rounding key"):
        jax.grad(lambda p: jnp.sum(model.apply(p, tokens[:, :-1])))(params)
    h = jnp.ones((2, 8, 128))
    with pytest.raises(ValueError, match="needs `key`"):
        chunked_cross_entropy(h, jnp.ones((128, 384)), tokens[:, 1:], fp4=cfg.fp4)


def test_collider_with_an_fp4_dense_model_is_refused():
    """Collider's filtered backward would bypass the FP4 backward (dW error 0.0 instead of
    ~0.18): the combination is refused rather than silently full precision."""
    from nanochat_jax.collider import Carrier

    cfg = model_config("tiny", vocab_size=384, seq_len=128, n_layers=1, ternary=False,
                       fp4_backward="nvfp4")
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 384)
    params = model.init(jax.random.key(0), tokens)
    with pytest.raises(ConfigError, match="Collider's filtered backward and an FP4 backward"):
        model.apply(params, tokens, carrier=Carrier.start(tokens.shape, 0.5),
                    method=Transformer.forward, rngs={"fp4": jax.random.key(2)})
