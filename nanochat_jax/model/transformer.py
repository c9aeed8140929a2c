"""The BitNet b1.58 decoder: embedding, a (possibly looped) block stack, MTP modules, LM head.

`forward` returns everything the training objective needs (`ModelOutput`);
`hidden_and_head` and `__call__` give the next-token prediction for evaluation and inference.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanochat_jax.collider import Carrier
from nanochat_jax.errors import ConfigError
from nanochat_jax.model.block import block_class, scanned_blocks
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.kv_cache import KVCache, copy_slots
from nanochat_jax.model.layers import greedy_tokens, rms_norm
from nanochat_jax.model.loop import exit_distribution, exit_hidden
from nanochat_jax.model.mtp import MTPModule, shift_left


class ModelOutput(NamedTuple):
    """What one forward pass gives the training objective. S = loops, M = MTP depth."""

    hidden: jax.Array  # [S, B, T, D] final-normed hidden state after each loop
    head: jax.Array  # [D, V] LM head weight (shared by every loop and MTP depth)
    loop_rms: jax.Array  # [S] RMS of the residual stream after each loop (before norms)
    exit_logits: jax.Array | None  # [S-1, B, T] exit-gate logits after loops 1..S-1
    mtp_hidden: jax.Array | None  # [M, B, T, D] normed hidden of depth k (predicts t+k+1)
    res_maps: jax.Array | None  # [2 L S, B, T, n, n] every mHC H_res in depth order
    carrier: Carrier | None  # the Collider carrier after the last BitLinear


class Decoded(NamedTuple):
    """What one cached step gives the inference engine (W = tokens fed per row)."""

    hidden: jax.Array  # [B, W, D] final-normed hidden for the LM head (the exit loop's)
    trunk: jax.Array  # [B, W, D] residual state after the last loop run (the MTP input h_0)
    exit_step: jax.Array  # [B, W] int32 loop each token exited after (0-based)
    cache: KVCache


class Transformer(nn.Module):
    """Decoder-only LM.

    Params: `embed/embedding [V, D]`, `block_{i}/...`, `final_norm/scale [D]`, `lm_head [D, V]`
    unless `tie_embeddings` (then the head is `embedding.T`); with loops > 1 also
    `loop_norm` (RMSNorm between loops) and `exit_gate` (Dense D -> 1); with MTP
    `mtp_{k}/...` for k = 0 .. depth-1.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model,
                              embedding_init=nn.initializers.normal(cfg.init_std))
        if cfg.scan_layers:
            self.stack = scanned_blocks(cfg)
        else:
            self.blocks = [block_class(cfg)(cfg, i, name=f"block_{i}") for i in range(cfg.n_layers)]
        self.final_norm = rms_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.initializers.normal(cfg.init_std),
                                      (cfg.d_model, cfg.vocab_size), jnp.float32)
        if cfg.loops > 1:
            self.loop_norm = rms_norm(cfg)
            self.exit_gate = nn.Dense(1, kernel_init=nn.initializers.normal(cfg.init_std))
        plain = dataclasses.replace(cfg, mhc_streams=0)
        self.mtp = [MTPModule(plain, name=f"mtp_{k}") for k in range(cfg.mtp_depth)]

    def _head(self) -> jax.Array:
        return self.embed.embedding.T if self.cfg.tie_embeddings else self.lm_head

    def _embed_stream(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> the residual stream [B, T, D] ([B, T, n, D] with mHC)."""
        x = self.embed(tokens).astype(self.cfg.dtype)  # [B, T, D]
        if self.cfg.mhc_streams:
            x = jnp.repeat(x[:, :, None, :], self.cfg.mhc_streams, axis=2)  # [B, T, n, D]
        return x

    def forward(self, tokens: jax.Array, loops: int | None = None, with_mtp: bool = True,
                carrier: Carrier | None = None) -> ModelOutput:
        """tokens [B, T] int -> ModelOutput; `loops` runs fewer loops than configured;
        `with_mtp=False` skips the MTP modules (inference); `carrier` turns on Collider's
        filtered backward (nanochat_jax/collider.py)."""
        cfg = self.cfg
        n_loops = cfg.loops if loops is None else loops
        if not 1 <= n_loops <= cfg.loops:
            raise ConfigError(f"loops must be in 1..{cfg.loops} for this model, got {n_loops}")
        x = self._embed_stream(tokens)
        hidden, gates, rms, maps = [], [], [], []
        stack_pass = Transformer._stack_pass
        if cfg.remat == "loop":  # keep each pass's input, recompute the pass in the backward
            stack_pass = nn.remat(stack_pass)
        for t in range(n_loops):
            if t:
                x = self.loop_norm(x)  # hidden norms grow across loops (docs/techniques.md#looplm)
            x, res, carrier = stack_pass(self, x, carrier)
            maps += res
            flat = jnp.mean(x, axis=2) if cfg.mhc_streams else x  # [B, T, D]
            rms.append(jnp.sqrt(jnp.mean(jnp.square(flat.astype(jnp.float32)))))
            hidden.append(self.final_norm(flat))
            if t < n_loops - 1:
                gates.append(self.exit_gate(hidden[-1])[..., 0])  # [B, T]
        mtp_hidden = []
        h = flat  # the trunk's last residual state h_0
        for k, module in enumerate(self.mtp if with_mtp else [], start=1):
            if cfg.mtp_kind == "sequential":
                h, normed, carrier, _ = module(h, self.embed(shift_left(tokens, k)), carrier)
            else:
                _, normed, carrier, _ = module(flat, carrier=carrier)
            mtp_hidden.append(normed)

        def stack(xs):
            return jnp.stack(xs) if xs else None

        return ModelOutput(hidden=jnp.stack(hidden), head=self._head(), loop_rms=jnp.stack(rms),
                           exit_logits=stack(gates), mtp_hidden=stack(mtp_hidden),
                           res_maps=jnp.concatenate(maps) if cfg.mhc_streams else None,
                           carrier=carrier)

    def _stack_pass(self, x: jax.Array, carrier: Carrier | None):
        """One pass of the block stack (one LoopLM loop) -> (x, per-block res maps, carrier)."""
        cfg = self.cfg
        if cfg.scan_layers:
            (x, carrier), res = self.stack((x, carrier), jnp.arange(cfg.n_layers))
            return x, [] if res is None else [res.reshape(-1, *res.shape[2:])], carrier
        maps = []
        for block in self.blocks:
            x, res, carrier, _ = block(x, carrier)
            maps.append(res)
        return x, maps, carrier

    def hidden_and_head(self, tokens: jax.Array, loops: int | None = None,
                        exit_threshold: float | None = None) -> tuple[jax.Array, jax.Array]:
        """tokens [B, T] int -> (final hidden [B, T, D], head weight [D, V]).

        Looped models use the last of `loops` loops, or with `exit_threshold` q each token's
        first loop whose exit CDF reaches q (docs/techniques.md#looplm).
        """
        out = self.forward(tokens, loops, with_mtp=self.is_initializing())  # init: every param
        if exit_threshold is None or out.exit_logits is None:
            return out.hidden[-1], out.head
        return exit_hidden(out.hidden, out.exit_logits, exit_threshold)[0], out.head

    def __call__(self, tokens: jax.Array, loops: int | None = None,
                 exit_threshold: float | None = None) -> jax.Array:
        """tokens [B, T] -> logits [B, T, V] (materialises all logits: use for small inputs)."""
        h, head = self.hidden_and_head(tokens, loops, exit_threshold)
        return jnp.dot(h, head.astype(h.dtype))

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
               exit_threshold: float | None = None) -> Decoded:
        """Prefill or decode with the KV cache: tokens [B, W] at positions [B, W] (consecutive
        per row) -> Decoded; the hidden states equal `hidden_and_head`'s at those positions.

        With `exit_threshold` q (docs/techniques.md#looplm) each token takes the hidden state of
        its first loop whose exit CDF reaches q, and a loop is skipped outright (`nn.cond`)
        once every token fed has exited; a skipped loop's cache slots get the previous loop's
        keys and values, so later tokens that do run that loop attend to those instead.
        """
        cfg = self.cfg
        if cfg.scan_layers:
            raise ConfigError("decoding with the KV cache runs on unrolled blocks: convert a "
                              "model.scan_layers=True model with "
                              "nanochat_jax.model.params.unscan(cfg, params)")
        x = self._embed_stream(tokens)
        n_layers = cfg.n_layers
        k, v = list(cache.k), list(cache.v)  # loop t, layer i at t * L + i: [B, Hkv, S, Dh]
        hidden, gates = [], []

        def run_loop(mdl, x, k_t, v_t, t):
            if t:
                x = mdl.loop_norm(x)
            ks, vs = [], []
            for i, block in enumerate(mdl.blocks):
                x, _, _, (k_i, v_i) = block(x, None, (k_t[i], v_t[i]), positions)
                ks.append(k_i)
                vs.append(v_i)
            return x, ks, vs

        for t in range(cfg.loops):
            now = slice(t * n_layers, (t + 1) * n_layers)
            if t and exit_threshold is not None:
                cdf = jnp.cumsum(exit_distribution(jnp.stack(gates)), axis=0)[:t]  # [t, B, W]
                all_exited = jnp.all(jnp.any(cdf >= exit_threshold, axis=0))

                def skip(mdl, x, k_t, v_t, k_prev, v_prev):
                    return (x, [copy_slots(a, b, positions)
                                for a, b in zip(k_prev, k_t, strict=True)],
                            [copy_slots(a, b, positions)
                             for a, b in zip(v_prev, v_t, strict=True)])

                def run(mdl, x, k_t, v_t, k_prev, v_prev, t=t):
                    return run_loop(mdl, x, k_t, v_t, t)

                before = slice((t - 1) * n_layers, t * n_layers)
                x, k[now], v[now] = nn.cond(all_exited, skip, run, self, x, k[now], v[now],
                                            k[before], v[before])
            else:
                x, k[now], v[now] = run_loop(self, x, k[now], v[now], t)
            flat = jnp.mean(x, axis=2) if cfg.mhc_streams else x  # [B, W, D]
            hidden.append(self.final_norm(flat))
            if t < cfg.loops - 1:
                gates.append(self.exit_gate(hidden[-1])[..., 0])  # [B, W]
        exit_step = jnp.full(tokens.shape, cfg.loops - 1, jnp.int32)
        chosen = hidden[-1]
        if exit_threshold is not None and gates:
            chosen, exit_step = exit_hidden(jnp.stack(hidden), jnp.stack(gates), exit_threshold)
        return Decoded(chosen, flat, exit_step, cache.replace(k=tuple(k), v=tuple(v)))

    def draft(self, trunk: jax.Array, fed: jax.Array, greedy: jax.Array, last: jax.Array,
              positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Greedy drafts of the next `mtp_depth` tokens (docs/techniques.md#mtp).

        trunk [B, W, D]: `decode`'s trunk for the tokens `fed` [B, W] at `positions`;
        greedy [B, W]: the main head's argmax there; last [B]: each row's last valid window
        index (the text after it is unknown). Depth d at window index j reads the token at
        stream index j + d - 1 of: fed[j + 1] before `last`, greedy[last] at `last`, then the
        drafts of the lower depths. -> (drafts [B, M], cache with the MTP slots written):
        the token after greedy[last], and so on.
        """
        last = last[:, None]  # [B, 1]
        if self.cfg.mtp_kind == "parallel":
            normed, cache = self.parallel_draft_hidden(trunk, positions, cache)  # [B, M, W, D]
            at_last = jnp.take_along_axis(normed, last[:, :, None, None], axis=2)[:, :, 0]
            return greedy_tokens(jnp.dot(at_last, self._head().astype(at_last.dtype))), cache
        window = jnp.arange(fed.shape[1])[None, :]  # [1, W]

        def pick(a, idx):
            return jnp.take_along_axis(a, jnp.clip(idx, 0, a.shape[1] - 1), 1)

        bonus = pick(greedy, last)  # [B, 1]
        h, drafts = trunk, []
        mtp_k, mtp_v = list(cache.mtp_k), list(cache.mtp_v)
        for d, module in enumerate(self.mtp, start=1):
            m = window + d - 1  # stream index each window slot reads
            later = pick(jnp.stack(drafts, 1), m - last - 1) if drafts else bonus
            nxt = jnp.where(m < last, pick(fed, m + 1), jnp.where(m == last, bonus, later))
            kv = (mtp_k[d - 1], mtp_v[d - 1])
            h, normed, _, kv = module(h, self.embed(nxt), None, kv, positions)
            mtp_k[d - 1], mtp_v[d - 1] = kv
            at_last = jnp.take_along_axis(normed, last[:, :, None], axis=1)[:, 0]  # [B, D]
            logits = jnp.dot(at_last, self._head().astype(at_last.dtype))  # [B, V]
            drafts.append(greedy_tokens(logits))
        return jnp.stack(drafts, 1), cache.replace(mtp_k=tuple(mtp_k), mtp_v=tuple(mtp_v))

    def parallel_draft_hidden(self, trunk: jax.Array, positions: jax.Array, cache: KVCache
                              ) -> tuple[jax.Array, KVCache]:
        """Parallel MTP heads over a decoded window: trunk [B, W, D] at positions [B, W] ->
        (normed hidden [B, M, W, D] for the LM head, cache with the MTP slots written).
        Depth d at window index j predicts the token d + 1 after fed[j]. No depth reads a
        token, so the drafts need not wait for the main head's argmax: the engine multiplies
        both by the head in one product."""
        if self.cfg.mtp_kind != "parallel":
            raise ConfigError("parallel_draft_hidden is for mtp_kind 'parallel'")
        normed, mtp_k, mtp_v = [], [], []
        for d, module in enumerate(self.mtp):
            _, out, _, (k, v) = module(trunk, None, None, (cache.mtp_k[d], cache.mtp_v[d]),
                                       positions)
            normed.append(out)
            mtp_k.append(k)
            mtp_v.append(v)
        return jnp.stack(normed, 1), cache.replace(mtp_k=tuple(mtp_k), mtp_v=tuple(mtp_v))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by `jax.eval_shape` of `init`: total, embedding/head, and the rest.
    Counted on the scanned twin (the same parameters, the blocks' stacked [L, ...]): one
    block is traced, not L."""
    model = Transformer(dataclasses.replace(cfg, scan_layers=True))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    total = sum(int(x.size) for x in jax.tree.leaves(shapes))
    embed = sum(int(x.size) for k, v in shapes.items() if k in ("embed", "lm_head")
                for x in jax.tree.leaves(v))
    return {"total": total, "embedding": embed, "non_embedding": total - embed}
