"""Small model functions: greedy token choice as argmax without XLA:CPU's slow (value, index)
reduction."""

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.model import layers


def test_greedy_tokens_is_argmax_with_the_first_of_tied_maxima():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 8192))
    np.testing.assert_array_equal(np.asarray(layers.greedy_tokens(logits)),
                                  np.asarray(jnp.argmax(logits, -1)))
    tied = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [-jnp.inf, -jnp.inf, 5.0, 5.0]])
    assert layers.greedy_tokens(tied).tolist() == [1, 2]
    assert layers.greedy_tokens(tied).dtype == jnp.int32
    assert layers.greedy_tokens(jnp.asarray([1.0, jnp.nan, 3.0])).tolist() == 0
