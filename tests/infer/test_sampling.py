"""Sampling respects temperature, top-k and top-p."""

import jax
import jax.numpy as jnp
import numpy as np
from numpy.testing import assert_array_equal

from nanochat_jax.infer.sampling import filter_top_k, filter_top_p, sample

LOGITS = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def test_temperature_zero_is_greedy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    for key in keys:
        assert_array_equal(sample(key, logits, temperature=0.0), jnp.argmax(logits, -1))


def test_top_k_keeps_exactly_the_k_largest():
    kept = np.isfinite(np.asarray(filter_top_k(LOGITS, 2)))
    assert_array_equal(kept, [[True, True, False, False, False]])
    assert_array_equal(filter_top_k(LOGITS, 0), LOGITS)  # 0 = off


def test_top_p_keeps_the_smallest_set_reaching_p():
    def kept(p):
        return np.isfinite(np.asarray(filter_top_p(LOGITS, p)))[0].tolist()

    assert kept(0.5) == [True, False, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, True, False, False, False]
    assert kept(0.86) == [True, True, True, True, False]
    assert kept(1.0) == [True] * 5
    assert kept(0.0) == [True, False, False, False, False]  # the top token always survives


def test_samples_never_leave_the_top_k_and_top_p_sets():
    key = jax.random.PRNGKey(1)
    logits = jnp.broadcast_to(LOGITS, (4000, 5))
    ids = np.asarray(jax.jit(lambda k, x: sample(k, x, temperature=1.0, top_k=3))(key, logits))
    assert set(ids.tolist()) <= {0, 1, 2}
    ids = np.asarray(sample(key, logits, temperature=1.0, top_p=0.6))
    assert set(ids.tolist()) == {0, 1}
    freq = np.bincount(ids, minlength=5) / ids.size  # renormalised 0.5 : 0.2
    assert abs(freq[0] - 0.5 / 0.7) < 0.03


def test_sampling_frequencies_follow_the_tempered_distribution():
    key = jax.random.PRNGKey(2)
    logits = jnp.broadcast_to(LOGITS, (20000, 5))
    for t in (0.5, 1.0, 2.0):
        ids = np.asarray(sample(key, logits, temperature=t))
        want = np.asarray(jax.nn.softmax(LOGITS[0] / t))
        assert np.abs(np.bincount(ids, minlength=5) / ids.size - want).max() < 0.015


def test_top_p_one_keeps_every_token_and_sorts_nothing():
    """A peaked 32k-vocabulary row: fp32's cumulative sum reaches 1.0 well before the tail,
    which once dropped thousands of tokens at top_p=1."""
    logits = jnp.concatenate([jnp.asarray([30.0]), jnp.linspace(0.0, -5.0, 32767)])[None]
    assert jnp.array_equal(filter_top_p(logits, 1.0), logits)
    assert "sort" not in str(jax.make_jaxpr(lambda x: filter_top_p(x, 1.0))(logits))
    traced = jax.jit(filter_top_p)(logits, jnp.float32(1.0))  # p as a traced scalar
    assert bool(jnp.all(jnp.isfinite(traced)))
