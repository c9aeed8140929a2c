"""The training objective: chunked token cross-entropy, z-loss, MTP and LoopLM losses.

The LM head is applied inside the loss, one `[N, chunk]` slab of logits at a time, with an
online logsumexp (running max, running sum of exp). The scan body is rematerialised
(`jax.checkpoint`), so neither forward nor backward ever holds all `[B, T, V]` logits.
`lm_objective` runs every loop step and MTP depth through one such pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nanochat_jax import collider
from nanochat_jax.model.hyper import composite_gain
from nanochat_jax.model.loop import exit_distribution, exit_entropy
from nanochat_jax.model.mtp import shift_left
from nanochat_jax.model.transformer import ModelOutput

Schedule = Callable[[jax.Array], jax.Array]


class LossOutput(NamedTuple):
    loss: jax.Array  # scalar: mean CE over unmasked tokens + z-loss
    ce: jax.Array  # scalar: mean CE over unmasked tokens (nats)
    entropy: jax.Array  # scalar: mean entropy of the predicted distribution (no gradient)
    token_ce: jax.Array  # [B, T] per-token CE (zero where masked)
    token_lse: jax.Array  # [B, T] per-token logsumexp of the logits (for the z-loss)
    token_entropy: jax.Array  # [B, T] per-token predictive entropy (no gradient)


class _Carry(NamedTuple):
    max: jax.Array  # [N] running max logit (no gradient)
    sum_exp: jax.Array  # [N] sum exp(z - max)
    sum_exp_z: jax.Array  # [N] sum exp(z - max) * z, for the entropy
    target_logit: jax.Array  # [N]


def _chunk_step(h, targets, vocab_size, chunk_size, fp4, key, carry: _Carry, xs):
    """Fold one vocabulary chunk of logits into the running logsumexp."""
    w, start = xs  # w: [D, C] head columns start .. start + C
    if fp4 is None:
        z = jnp.dot(h, w, preferred_element_type=jnp.float32)  # [N, C]
    else:  # FP4 backward (ternary/fp4.py), a fresh rounding key per chunk
        z = fp4.dot(h, w, jax.random.fold_in(key, start)).astype(jnp.float32)
    col = start + jnp.arange(chunk_size)
    valid = col < vocab_size  # the last chunk may be padding
    z = jnp.where(valid[None, :], z, -jnp.inf)
    new_max = jax.lax.stop_gradient(jnp.maximum(carry.max, jnp.max(z, axis=-1)))
    rescale = jnp.exp(carry.max - new_max)
    e = jnp.exp(z - new_max[:, None])  # [N, C], 0 on padding
    z_finite = jnp.where(valid[None, :], z, 0.0)
    hit = col[None, :] == targets[:, None]
    return _Carry(
        max=new_max,
        sum_exp=carry.sum_exp * rescale + jnp.sum(e, axis=-1),
        sum_exp_z=carry.sum_exp_z * rescale + jnp.sum(e * jax.lax.stop_gradient(z_finite), -1),
        target_logit=carry.target_logit + jnp.sum(jnp.where(hit, z_finite, 0.0), axis=-1),
    ), None


def chunked_cross_entropy(
    hidden: jax.Array,  # [B, T, D]
    head: jax.Array,  # [D, V]
    targets: jax.Array,  # [B, T] int
    mask: jax.Array | None = None,  # [B, T]; 0 marks padding
    *,
    chunk_size: int = 8192,
    z_loss: float = 0.0,
    fp4: Any = None,
    key: jax.Array | None = None,
) -> LossOutput:
    """Mean next-token CE over unmasked tokens, plus `z_loss * mean(logsumexp^2)` (PaLM).
    `fp4` (a ternary.fp4.Backward) runs the head matmul's backward in FP4, rounding with
    `key`."""
    b, t, d = hidden.shape
    vocab = head.shape[1]
    chunk = min(chunk_size, vocab)
    n_chunks = -(-vocab // chunk)
    head = jnp.pad(head, ((0, 0), (0, n_chunks * chunk - vocab)))
    w_chunks = head.reshape(d, n_chunks, chunk).transpose(1, 0, 2)  # [n_chunks, D, C]
    starts = jnp.arange(n_chunks) * chunk
    h = hidden.reshape(b * t, d).astype(head.dtype)
    tgt = targets.reshape(b * t)
    n = b * t
    init = _Carry(jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)), jnp.zeros((n,)))
    if fp4 is not None and key is None:
        raise ValueError("chunked_cross_entropy with an FP4 backward needs `key`, a fresh "
                         "rounding key per step")
    body = jax.checkpoint(lambda c, xs: _chunk_step(h, tgt, vocab, chunk, fp4, key, c, xs))
    carry, _ = jax.lax.scan(body, init, (w_chunks, starts))
    lse = carry.max + jnp.log(carry.sum_exp)  # [N]
    token_ce = lse - carry.target_logit
    entropy = jax.lax.stop_gradient(lse - carry.sum_exp_z / carry.sum_exp)

    m = jnp.ones((n,), jnp.float32) if mask is None else mask.reshape(n).astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(m), 1.0)

    def mean(x):
        return jnp.sum(x * m) / denom

    ce = mean(token_ce)
    loss = ce + z_loss * mean(jnp.square(lse)) if z_loss else ce
    return LossOutput(loss, ce, mean(entropy), (token_ce * m).reshape(b, t), lse.reshape(b, t),
                      entropy.reshape(b, t))


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Plain mean CE from full logits [B, T, V]: the reference the chunked version must equal."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the positions where mask is true (0 when there are none)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _zero(step):
    return jnp.zeros((), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the train step minimises; the weights are schedules of the step (optax style)."""

    pad_id: int  # PAD targets are masked; also fills MTP targets past the sequence end
    vocab_chunk: int = 8192
    z_loss: float = 0.0
    mtp_weight: Schedule = _zero  # lambda: L += lambda * mean_k L_mtp_k  (docs/techniques.md#mtp)
    loop_entropy: Schedule = _zero  # beta in E_p[L(t)] - beta H(p)  (docs/techniques.md#looplm)
    keep_ratio: float | None = None  # share of positions trained on (docs/techniques.md#collider)
    sparse_backward: bool = True  # Collider's filtered BitLinear backward; False: exact (Rho-1)
    fp4: Any = None  # LM head's ternary.fp4.Backward (docs/techniques.md#fp4); None: full precision


def lm_objective(out: ModelOutput, targets: jax.Array, mask: jax.Array, obj: Objective,
                 step: jax.Array, reference_loss: jax.Array | None = None,
                 key: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """(scalar loss, metrics, per-token loss [B, T] zero where masked) of one forward pass.

    - Next-token CE of the last loop (`loss/ce`, comparable across every configuration).
    - Looped (S > 1): the per-token expected CE under the exit distribution minus
      beta * its entropy replaces the plain CE (`loss/loop_exit`, `loop/mean_exit_step`).
    - MTP depth k: CE against targets shifted k further, masked past the sequence end and
      averaged over its own valid tokens; `lambda / M * sum_k` is added (`loss/mtp`).
    - z-loss on the last loop's logsumexp; mHC composite gains as metrics.
    - Collider (`obj.keep_ratio`): every term is averaged over the kept positions only: the
      top positions by per-token loss, or by excess loss over `reference_loss` [B, T].
      `loss/ce` stays the mean over every valid token.
    - `obj.fp4`: the LM head's backward in FP4, stochastic rounding from `key`.
    """
    s = out.hidden.shape[0]
    depth = 0 if out.mtp_hidden is None else out.mtp_hidden.shape[0]
    rows, tgts, masks = [out.hidden], [targets] * s, [mask] * s
    if depth:
        rows.append(out.mtp_hidden)
        tgts += [shift_left(targets, k, obj.pad_id) for k in range(1, depth + 1)]
        masks += [shift_left(mask, k, False) for k in range(1, depth + 1)]
    hidden = jnp.concatenate(rows)  # [R, B, T, D], R = S + M
    r, b, t, d = hidden.shape
    ce = chunked_cross_entropy(hidden.reshape(r * b, t, d), out.head,
                               jnp.stack(tgts).reshape(r * b, t),
                               jnp.stack(masks).reshape(r * b, t), chunk_size=obj.vocab_chunk,
                               fp4=obj.fp4, key=key)
    token_ce = ce.token_ce.reshape(r, b, t)
    last = s - 1

    def mean(x):
        return masked_mean(x, mask)

    metrics = {"loss/ce": mean(token_ce[last]),
               "training/entropy": mean(ce.token_entropy.reshape(r, b, t)[last])}
    token_loss = token_ce[last]
    if s > 1:
        p = exit_distribution(out.exit_logits)  # [S, B, T]
        expected = jnp.sum(p * token_ce[:s], axis=0)
        entropy = exit_entropy(p)
        beta = obj.loop_entropy(step)
        token_loss = expected - beta * entropy
        metrics.update({"loss/loop_exit": mean(expected),
                        "loop/mean_exit_step": mean(jnp.tensordot(jnp.arange(1.0, s + 1), p, 1)),
                        "loop/exit_entropy": mean(entropy),
                        "loop/entropy_weight": jnp.asarray(beta, jnp.float32)})
        for i in range(s):
            metrics[f"loop/ce/step{i + 1}"] = mean(token_ce[i])
            metrics[f"loop/hidden_rms/step{i + 1}"] = out.loop_rms[i]
    weight = mask  # the positions that are trained on
    if obj.keep_ratio is not None:
        scores = token_loss if reference_loss is None else token_loss - reference_loss
        kept = (out.carrier.kept if out.carrier is not None
                else collider.kept_count(obj.keep_ratio, mask.size))
        keep = collider.keep_mask(scores, mask, kept)  # [B, T] 0/1, no gradient
        weight = mask & (keep > 0)
        metrics["collider/keep_ratio"] = jnp.sum(weight) / jnp.maximum(jnp.sum(mask), 1)
    loss = masked_mean(token_loss, weight)
    if obj.keep_ratio is not None and out.carrier is not None:
        # 0 in value; makes the carrier's cotangent the keep mask in every BitLinear
        loss = loss + jnp.sum(out.carrier.value * keep)
    if depth:
        per_depth = jnp.stack([masked_mean(token_ce[s + k], masks[s + k] & weight)
                               for k in range(depth)])
        mtp_weight = obj.mtp_weight(step)  # (not `weight`: the z-loss below needs the mask)
        loss = loss + mtp_weight * jnp.mean(per_depth)
        metrics.update({"loss/mtp": jnp.mean(per_depth),
                        "loss/mtp_weight": jnp.asarray(mtp_weight, jnp.float32)})
        metrics.update({f"loss/mtp/depth{k + 1}": per_depth[k] for k in range(depth)})
    if obj.z_loss:
        loss = loss + obj.z_loss * masked_mean(jnp.square(ce.token_lse.reshape(r, b, t)[last]),
                                               weight)
    if out.res_maps is not None:
        forward_gain, backward_gain = composite_gain(out.res_maps)
        metrics.update({"mhc/composite_gain": backward_gain,
                        "mhc/composite_gain_forward": forward_gain})
    metrics["loss/total"] = loss
    return loss, metrics, token_loss * mask
