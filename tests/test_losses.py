"""Chunked cross-entropy equals the plain one, with masks, z-loss and entropy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from nanochat_jax.losses import chunked_cross_entropy, cross_entropy

B, T, D, V = 2, 5, 16, 50


def _inputs(seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, vocab)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(B, T)), jnp.int32)
    mask = rng.random((B, T)) < 0.6
    mask[0, 0], mask[0, 1] = True, False  # at least one token on each side
    return hidden, head, targets, jnp.asarray(mask, jnp.int32)


def _plain(hidden, head, targets, mask=None):
    return cross_entropy(jnp.einsum("btd,dv->btv", hidden, head), targets, mask)


# compiled once per (shapes, chunk_size, z_loss): much cheaper than op-by-op on CPU
_ce = jax.jit(chunked_cross_entropy, static_argnames=("chunk_size", "z_loss"))


def _chunked(hidden, head, targets, mask=None, **kw):
    return chunked_cross_entropy(hidden, head, targets, mask, **kw).loss


_chunked_value_and_grad = jax.jit(jax.value_and_grad(_chunked, argnums=(0, 1)),
                                  static_argnames=("chunk_size", "z_loss"))


CHUNKS = [7, 10, 64]  # 7 does not divide V = 50, 10 does (5 chunks), 64 exceeds it


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_chunked_cross_entropy_equals_plain_cross_entropy(chunk_size, masked):
    hidden, head, targets, mask = _inputs(chunk_size)
    mask = mask if masked else None
    out = _ce(hidden, head, targets, mask, chunk_size=chunk_size)
    expected = float(_plain(hidden, head, targets, mask))
    assert_allclose(float(out.loss), expected, rtol=1e-5)
    assert_allclose(float(out.ce), expected, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_cross_entropy_gradients_equal_plain(chunk_size):
    hidden, head, targets, mask = _inputs(100 + chunk_size)
    _, g_chunk = _chunked_value_and_grad(hidden, head, targets, mask, chunk_size=chunk_size)
    g_plain = jax.grad(lambda h, w: _plain(h, w, targets, mask), argnums=(0, 1))(hidden, head)
    for a, b in zip(g_chunk, g_plain, strict=True):
        assert a.shape == b.shape
        assert np.all(np.isfinite(np.asarray(a)))
        assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(g_plain[1])).max() > 1e-3  # the head gradient is not trivially 0


def test_chunked_cross_entropy_is_correct_for_large_logits():
    """The online logsumexp must not overflow where exp(logit) would."""
    hidden, head, targets, _ = _inputs(3)
    head = head * 200.0
    out = _ce(hidden, head, targets, chunk_size=7)
    assert np.isfinite(float(out.loss))
    assert_allclose(float(out.loss), float(_plain(hidden, head, targets)), rtol=1e-5)


def test_changing_a_masked_target_changes_nothing():
    hidden, head, targets, mask = _inputs(4)
    masked = np.argwhere(np.asarray(mask) == 0)
    assert len(masked) > 0
    b, t = masked[0]

    def f(tg):
        return _chunked_value_and_grad(hidden, head, tg, mask, chunk_size=7)

    base_loss, base_grads = f(targets)
    for new_target in ((int(targets[b, t]) + 1) % V, -1):  # another id, a padding id
        loss, grads = f(targets.at[b, t].set(new_target))
        assert float(loss) == float(base_loss)
        for a, c in zip(grads, base_grads, strict=True):
            assert_array_equal(np.asarray(a), np.asarray(c))
    # whereas an unmasked target does matter
    b, t = np.argwhere(np.asarray(mask) == 1)[0]
    loss, _ = f(targets.at[b, t].set((int(targets[b, t]) + 1) % V))
    assert float(loss) != float(base_loss)


def test_mask_excludes_tokens_from_the_mean():
    hidden, head, targets, mask = _inputs(5)
    out = _ce(hidden, head, targets, mask, chunk_size=7)
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    m = np.asarray(mask, bool)
    assert_allclose(float(out.ce), float(np.asarray(nll)[m].mean()), rtol=1e-5)


def test_all_masked_batch_gives_zero_loss_not_nan():
    hidden, head, targets, _ = _inputs(6)
    mask = jnp.zeros((B, T), jnp.int32)
    out = _ce(hidden, head, targets, mask, chunk_size=7, z_loss=1e-4)
    for x in (out.loss, out.ce, out.entropy):
        assert float(x) == 0.0
    assert_array_equal(np.asarray(out.token_ce), 0.0)
    _, grads = _chunked_value_and_grad(hidden, head, targets, mask, chunk_size=7, z_loss=1e-4)
    for g in grads:
        assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("z", [1e-4, 0.5])
def test_z_loss_adds_z_times_mean_squared_logsumexp(z, masked):
    hidden, head, targets, mask = _inputs(7)
    mask = mask if masked else None
    out = _ce(hidden, head, targets, mask, chunk_size=7, z_loss=z)
    lse = np.asarray(jax.nn.logsumexp(jnp.einsum("btd,dv->btv", hidden, head), axis=-1))
    m = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    expected_z = z * np.mean(lse[m] ** 2)
    # loss - ce cancels in float32: allow a few ulp of the loss (~4) on top of rtol
    assert_allclose(float(out.loss) - float(out.ce), expected_z, rtol=1e-4, atol=2e-6)
    assert_allclose(float(out.ce), float(_plain(hidden, head, targets, mask)), rtol=1e-5)


def test_z_loss_gradient_matches_reference():
    hidden, head, targets, mask = _inputs(8)
    z = 0.1

    def reference(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        m = mask.astype(jnp.float32)
        return cross_entropy(logits, targets, mask) + z * jnp.sum(lse ** 2 * m) / jnp.sum(m)

    g_ref = jax.grad(reference, argnums=(0, 1))(hidden, head)
    _, g = _chunked_value_and_grad(hidden, head, targets, mask, chunk_size=7, z_loss=z)
    for a, b in zip(g, g_ref, strict=True):
        assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_z_loss_of_zero_leaves_loss_equal_to_ce():
    hidden, head, targets, mask = _inputs(9)
    out = _ce(hidden, head, targets, mask, chunk_size=7, z_loss=0.0)
    assert float(out.loss) == float(out.ce)


@pytest.mark.parametrize("chunk_size", [7, 64])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_entropy_equals_mean_entropy_of_softmax(chunk_size, masked):
    hidden, head, targets, mask = _inputs(10)
    mask = mask if masked else None
    out = _ce(hidden, head, targets, mask, chunk_size=chunk_size)
    logp = np.asarray(jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, head), axis=-1),
                      np.float64)
    entropy = -np.sum(np.exp(logp) * logp, axis=-1)  # [B, T]
    m = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    assert_allclose(float(out.entropy), entropy[m].mean(), rtol=1e-4)


def test_entropy_has_no_gradient():
    hidden, head, targets, _ = _inputs(11)
    g = jax.jit(jax.grad(lambda h: chunked_cross_entropy(h, head, targets, chunk_size=7).entropy))(
        hidden)
    assert_array_equal(np.asarray(g), 0.0)


def test_token_ce_is_per_token_nll_and_zero_at_masked_positions():
    hidden, head, targets, mask = _inputs(12)
    out = _ce(hidden, head, targets, mask, chunk_size=7)
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, head), axis=-1)
    nll = -np.asarray(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0])
    token_ce = np.asarray(out.token_ce)
    chex.assert_shape(token_ce, (B, T))
    m = np.asarray(mask, bool)
    assert_array_equal(token_ce[~m], 0.0)
    assert_allclose(token_ce[m], nll[m], rtol=1e-5)
    assert np.all(token_ce[m] > 0)


def test_chunked_cross_entropy_of_uniform_logits_is_log_vocab():
    hidden, _, targets, _ = _inputs(13)
    head = jnp.zeros((D, V))
    out = _ce(hidden, head, targets, chunk_size=7)
    assert_allclose(float(out.ce), np.log(V), rtol=1e-6)
    assert_allclose(float(out.entropy), np.log(V), rtol=1e-6)
