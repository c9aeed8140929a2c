"""LoopLM (docs/techniques.md#looplm): when a looped model stops, as a distribution.

Gate logits z_t (t = 1..S-1) give lambda_t = sigmoid(z_t), survival
S_t = prod_{j<=t} (1 - lambda_j), and p(t) = lambda_t S_{t-1} for t < S, p(S) = S_{S-1}.
Computed in log space (log_sigmoid) so long loops and saturated gates stay finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def exit_distribution(gate_logits: jax.Array) -> jax.Array:
    """gate logits [S-1, ...] -> p(t | x) [S, ...], summing to 1 over the first axis."""
    log_stay = jax.nn.log_sigmoid(-gate_logits)  # log(1 - lambda_t)
    log_survive = jnp.cumsum(log_stay, axis=0)  # log S_t, t = 1..S-1
    log_survive_before = jnp.concatenate([jnp.zeros_like(log_survive[:1]), log_survive], 0)
    log_exit = jnp.concatenate([jax.nn.log_sigmoid(gate_logits),
                                jnp.zeros_like(gate_logits[:1])], 0)  # lambda_S := 1
    return jnp.exp(log_exit + log_survive_before)


def exit_entropy(p: jax.Array) -> jax.Array:
    """H(p) over the first axis (nats); <= log S."""
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=0)


def early_exit_step(gate_logits: jax.Array, threshold: float) -> jax.Array:
    """The first loop m (0-based) with CDF(m) = 1 - S_m >= threshold; the last loop if none.

    gate logits [S-1, ...] -> int32 [...]; threshold 0 always exits after the first loop.
    """
    cdf = jnp.cumsum(exit_distribution(gate_logits), axis=0)  # [S, ...]
    reached = cdf >= threshold
    reached = reached.at[-1].set(True)
    return jnp.argmax(reached, axis=0).astype(jnp.int32)


def exit_hidden(hidden: jax.Array, gate_logits: jax.Array, threshold: float
                ) -> tuple[jax.Array, jax.Array]:
    """Each token's hidden state after its early-exit loop: hidden [S, B, T, D] ->
    ([B, T, D], the loop index [B, T] from `early_exit_step`)."""
    step = early_exit_step(gate_logits, threshold)
    return jnp.take_along_axis(hidden, step[None, :, :, None], axis=0)[0], step
