"""Generation with a preallocated KV cache: prefill, then a jit-compiled decode step.

    engine = Engine(Transformer(cfg), variables)       # {'params'} or pack_params(...)
    result = engine.generate([[1, 5, 9], [1, 7]], Generation(max_new_tokens=64))
    for tokens in engine.stream([1, 5, 9], Generation(temperature=0.7)): ...

Prompts of different lengths share one batch: they are right-padded and every row keeps its
own position (model/kv_cache.py). Shapes are bucketed (prompt length and cache length to
multiples of `BUCKET`), so a new prompt recompiles only when it crosses a bucket and decoding
never recompiles per token. `generate` runs the whole decode loop on the device
(`lax.while_loop`, stopping when every row has hit a stop token or the token budget);
`stream` runs the same compiled step from Python and yields tokens as they come.

Self-speculative decoding (greedy, models with MTP; docs/techniques.md#mtp): the MTP modules
draft the next M tokens, one forward pass of the main model over [pending, drafts] verifies
them, and the longest prefix that matches the main model's own argmax is accepted plus its
next token, so the output is plain greedy decoding's, token for token, in fewer main-model
passes.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.errors import ConfigError
from nanochat_jax.infer.sampling import sample
from nanochat_jax.model.kv_cache import KVCache
from nanochat_jax.model.layers import greedy_tokens
from nanochat_jax.model.packed import for_cpu, pack_params
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary import tile_cache, tuning

BUCKET = 64  # prompt and cache lengths are rounded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class Generation:
    """How to generate. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off;
    generation of a row stops after `max_new_tokens` or at the first of `stop_tokens`
    (not included in the output). `exit_threshold`: LoopLM adaptive exit q (None: every
    loop); `speculative`: MTP self-speculative greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    exit_threshold: float | None = None
    speculative: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                              f"{self.temperature}, {self.top_k}, {self.top_p}")
        if self.exit_threshold is not None and not 0 <= self.exit_threshold <= 1:
            raise ConfigError(f"exit_threshold must be in [0, 1], got {self.exit_threshold}")
        if self.speculative and (self.temperature > 0 or self.exit_threshold is not None):
            raise ConfigError("speculative decoding is greedy with every loop: set temperature "
                              "0 and no exit_threshold")


@dataclasses.dataclass
class Result:
    """Generated tokens per row (prompt excluded, stop token dropped) and decode counters."""

    tokens: list[list[int]]
    main_passes: int  # decode-step forward passes of the main model after the prefill
    drafted: int = 0  # speculative: draft tokens proposed, summed over rows
    accepted: int = 0  # speculative: draft tokens accepted
    prefill_seconds: float = 0.0  # wall time of the prefill (compilation included if any)
    decode_seconds: float = 0.0  # wall time of the decode loop, to the tokens on the host

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    """Generation from a Transformer and its variables (latent `{'params'}` or the packed
    ternary weights of `model.packed.pack_params`).

    `pack` (default): a ternary model's latent BitLinear kernels are packed once, here
    (2-bit codes + scale, the exact same products), instead of being ternarised again in
    every decode step; a `fake_quant` model (float products, `ModelConfig.uses_kernel` False)
    and a dense one keep theirs.
    On a CPU with the native kernel the packed codes are put in its tile order, also once.
    On a GPU/TPU the kernel's tiles are tuned for each new prompt and cache shape before it
    compiles (`say` gets the tuner's lines; default: stderr).
    """

    def __init__(self, model: Transformer, variables: dict, cache_dtype=jnp.float32,
                 pack: bool = True, say: Callable[[str], None] | None = None):
        cfg = model.cfg
        if pack and cfg.uses_kernel and "packed" not in variables:
            variables = pack_params(variables)
        if "packed" in variables:
            variables = for_cpu(variables)
        self.model, self.variables, self.cache_dtype = model, variables, cache_dtype
        self.cfg = cfg
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("gen", "length"))
        self._step = jax.jit(self._step_fn, static_argnames=("gen",), donate_argnums=(1,))
        self._verify = jax.jit(self._verify_fn, donate_argnums=(1,))
        self._loop = jax.jit(self._loop_fn, static_argnames=("gen",))
        self._tuned: set = set()  # prompt and cache shapes whose kernel tiles are tuned
        self._say = say or _to_stderr  # the kernel tuner's progress lines (GPU/TPU)

    # ---- public API ------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], gen: Generation = Generation(),
                 key: jax.Array | None = None) -> Result:
        """Complete every prompt (lists of token ids) in one batch; the loop runs on device."""
        started = time.perf_counter()
        key, lengths, (cache, first, drafts) = self._start(prompts, gen, key)
        first.block_until_ready()  # the one wait between the two phases, for their timings
        prefilled = time.perf_counter()
        out, count, passes, drafted, accepted = self._loop(self.variables, cache, first,
                                                           drafts, lengths, key, gen=gen)
        out, count = np.asarray(out), np.asarray(count)
        decoded = time.perf_counter()
        rows = [_until_stop(out[b, :min(int(count[b]), gen.max_new_tokens)], gen.stop_tokens)
                for b in range(len(prompts))]
        return Result(rows, int(passes), int(drafted), int(accepted), prefilled - started,
                      decoded - prefilled)

    def stream(self, prompt: Sequence[int], gen: Generation = Generation(),
               key: jax.Array | None = None) -> Iterator[list[int]]:
        """Yield the new tokens of one prompt as each decode step makes them (one token, or
        several when speculative drafts are accepted); stops like `generate`."""
        key, lengths, (cache, token, drafts) = self._start([prompt], gen, key)
        position, produced = lengths, 0
        new = [int(token[0])]
        while True:
            new = new[:gen.max_new_tokens - produced]
            kept = _until_stop(np.asarray(new), gen.stop_tokens)
            if kept:
                yield kept
            produced += len(new)
            if len(kept) < len(new) or produced >= gen.max_new_tokens:
                return
            if gen.speculative:
                cache, emitted, n_new, drafts = self._verify(self.variables, cache, token,
                                                             drafts, position)
                n = int(n_new[0])
                new = [int(t) for t in np.asarray(emitted[0, :n])]
                token, position = emitted[:, n - 1], position + n
            else:
                step_key = jax.random.fold_in(key, produced)
                cache, token = self._step(self.variables, cache, token, position, step_key,
                                          gen=gen)
                new, position = [int(token[0])], position + 1

    def lower_decode_step(self, batch: int, length: int, gen: Generation = Generation(),
                          rows: jax.sharding.NamedSharding | None = None) -> jax.stages.Lowered:
        """The compiled piece of `stream`, one decode step for `batch` rows and a cache of
        `length` slots, lowered ahead of time from abstract operands (experiments/compile.py:
        `self.variables` may hold `jax.ShapeDtypeStruct`s). `rows`: the sharding of a [B]
        vector (tokens, positions; the cache follows it along its row dimension)."""
        def placed(x):  # rows lead every operand
            if rows is None:
                return jax.ShapeDtypeStruct(x.shape, x.dtype)
            spec = jax.sharding.PartitionSpec(*rows.spec)
            return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=jax.NamedSharding(rows.mesh, spec))

        cache = jax.eval_shape(lambda: KVCache.zeros(self.cfg, batch, length, self.cache_dtype))
        cache = jax.tree.map(placed, cache)  # every array [B, Hkv, S, Dh]
        vector = placed(jax.ShapeDtypeStruct((batch,), jnp.int32))
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rows and jax.NamedSharding(
            rows.mesh, jax.sharding.PartitionSpec()))
        return self._step.lower(self.variables, cache, vector, vector, key, gen=gen)

    # ---- shapes ----------------------------------------------------------------------------

    def _start(self, prompts: Sequence[Sequence[int]], gen: Generation, key: jax.Array | None):
        """Check and pad the prompts, then prefill.
        -> (key, lengths [B], (cache, first token [B], drafts [B, M] or None))."""
        tokens, lengths, length = self._batch(prompts, gen)
        key = jax.random.key(0) if key is None else key
        self._tune_kernel(tokens, lengths, key, gen, length)
        return key, lengths, self._prefill(self.variables, tokens, lengths, key, gen=gen,
                                           length=length)

    def _tune_kernel(self, tokens, lengths, key, gen: Generation, length: int) -> None:
        """On GPU/TPU, time the kernel's tilings for the products of the prefill and of the
        decode loop at these shapes before either compiles (ternary/tuning.py: nothing is
        timed while tracing; the tiles are cached on disk for later processes). Once per
        shape; nothing on a CPU."""
        signature = (tokens.shape, length, gen)
        if not self.cfg.tunes_kernel or signature in self._tuned:
            return
        prefill = functools.partial(self._prefill_fn, gen=gen, length=length)
        cache, first, drafts = jax.eval_shape(prefill, self.variables, tokens, lengths, key)
        loop = functools.partial(self._loop_fn, gen=gen)
        _, prefill_pending = tile_cache.lookups_in(prefill, self.variables, tokens, lengths, key)
        _, loop_pending = tile_cache.lookups_in(loop, self.variables, cache, first, drafts,
                                                lengths, key)
        if prefill_pending or loop_pending:
            tuning.tune_pending(keys=prefill_pending + loop_pending, say=self._say)
        self._tuned.add(signature)

    def _batch(self, prompts: Sequence[Sequence[int]], gen: Generation):
        """Right-padded prompts [B, P] (P bucketed), lengths [B], and the cache length."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token (start with BOS)")
        if gen.speculative and not self.cfg.mtp_depth:
            raise ConfigError("speculative decoding drafts with the MTP modules: this model "
                              "has mtp_depth 0")
        if gen.exit_threshold is not None and self.cfg.loops == 1:
            raise ConfigError("exit_threshold needs a looped model (loops > 1)")
        vocab = self.cfg.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise ConfigError(f"prompt token ids must be in [0, {vocab}) for this model")
        lengths = np.array([len(p) for p in prompts], np.int32)
        padded = _round_up(int(lengths.max()), BUCKET)
        tokens = np.zeros((len(prompts), padded), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        # the last verify pass may write M + 1 slots past the last kept token
        extra = self.cfg.mtp_depth + 1 if gen.speculative else 0
        length = _round_up(int(lengths.max()) + gen.max_new_tokens + extra, BUCKET)
        return jnp.asarray(tokens), jnp.asarray(lengths), max(length, padded)

    # ---- compiled pieces -------------------------------------------------------------------

    def _logits(self, variables, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] through the LM head."""
        head = self.model.apply(variables, method=lambda m: m._head())
        return jnp.dot(hidden, head.astype(hidden.dtype))

    def _prefill_fn(self, variables, tokens, lengths, key, *, gen: Generation, length: int):
        """-> (cache, first generated token [B], MTP drafts [B, M] or None)."""
        b, p = tokens.shape
        cache = KVCache.zeros(self.cfg, b, length, self.cache_dtype)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        out = self.model.apply(variables, tokens, positions, cache, gen.exit_threshold,
                               method=Transformer.decode)
        last = lengths - 1
        at_last = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        first = sample(key, self._logits(variables, at_last), temperature=gen.temperature,
                       top_k=gen.top_k, top_p=gen.top_p)
        if not gen.speculative:
            return out.cache, first, None
        greedy = greedy_tokens(self._logits(variables, out.hidden))
        greedy = greedy.at[jnp.arange(b), last].set(first)
        drafts, cache = self.model.apply(variables, out.trunk, tokens, greedy, last,
                                         positions, out.cache, method=Transformer.draft)
        return cache, first, drafts

    def _step_fn(self, variables, cache, token, position, key, *, gen: Generation):
        """One decode step: token [B] at position [B] -> (cache, next token [B])."""
        out = self.model.apply(variables, token[:, None], position[:, None], cache,
                               gen.exit_threshold, method=Transformer.decode)
        logits = self._logits(variables, out.hidden[:, 0])
        nxt = sample(key, logits, temperature=gen.temperature, top_k=gen.top_k,
                     top_p=gen.top_p)
        return out.cache, nxt

    def _verify_fn(self, variables, cache, token, drafts, position):
        """One speculative step: feed [token, drafts] [B, M+1] at position.. ; accept the
        drafts that match the main model's argmax. -> (cache, emitted [B, M+1] (the first
        n_new are new tokens), n_new [B] in 1..M+1, next drafts [B, M])."""
        fed = jnp.concatenate([token[:, None], drafts], axis=1)  # [B, M+1]
        positions = position[:, None] + jnp.arange(fed.shape[1], dtype=jnp.int32)[None, :]
        out = self.model.apply(variables, fed, positions, cache, method=Transformer.decode)
        if self.cfg.mtp_kind == "parallel":  # verdicts and drafts from one head product
            mtp, cache = self.model.apply(variables, out.trunk, positions, out.cache,
                                          method=Transformer.parallel_draft_hidden)
            rows = jnp.concatenate([out.hidden[:, None], mtp], axis=1)  # [B, 1 + M, W, D]
            every = greedy_tokens(self._logits(variables, rows))  # [B, 1 + M, W]
            greedy = every[:, 0]
            accepted = _leading_matches(drafts, greedy)
            new_drafts = jnp.take_along_axis(every[:, 1:], accepted[:, None, None], axis=2)
            return cache, greedy, accepted + 1, new_drafts[:, :, 0]
        greedy = greedy_tokens(self._logits(variables, out.hidden))
        accepted = _leading_matches(drafts, greedy)
        new_drafts, cache = self.model.apply(variables, out.trunk, fed, greedy, accepted,
                                             positions, out.cache, method=Transformer.draft)
        return cache, greedy, accepted + 1, new_drafts

    def _loop_fn(self, variables, cache, first, drafts, lengths, key, *, gen: Generation):
        """The decode loop on device. -> (tokens [B, N + M + 1], count [B], main passes,
        drafts proposed and accepted, summed over the rows still generating)."""
        b, budget = first.shape[0], gen.max_new_tokens
        width = self.cfg.mtp_depth + 1 if gen.speculative else 1
        out = jnp.zeros((b, budget + width), jnp.int32).at[:, 0].set(first)
        stop = jnp.asarray(gen.stop_tokens or (-1,), jnp.int32)
        done = jnp.isin(first, stop) | (budget <= 1)
        zero = jnp.int32(0)
        state = (cache, first, drafts, lengths, out, jnp.ones(b, jnp.int32), done, zero, zero,
                 zero)

        def cond(state):
            return ~jnp.all(state[6])

        def body(state):
            cache, token, drafts, position, out, count, done, passes, drafted, accepted = state
            if gen.speculative:
                cache, emitted, n_new, drafts = self._verify_fn(variables, cache, token,
                                                                drafts, position)
                token = jnp.take_along_axis(emitted, n_new[:, None] - 1, axis=1)[:, 0]
            else:
                cache, token = self._step_fn(variables, cache, token, position,
                                             jax.random.fold_in(key, passes + 1), gen=gen)
                emitted, n_new = token[:, None], jnp.ones(b, jnp.int32)
            live = ~done
            out = jnp.where(live[:, None], _write_at(out, emitted, count), out)
            fresh = jnp.arange(width)[None, :] < n_new[:, None]
            hit = jnp.any(jnp.isin(emitted, stop) & fresh, axis=1)
            drafted += jnp.sum(live) * (width - 1)
            accepted += jnp.sum(jnp.where(live, n_new - 1, 0))
            count = jnp.where(live, count + n_new, count)
            position = jnp.where(live, position + n_new, position)
            done = done | hit | (count >= budget)
            return (cache, token, drafts, position, out, count, done, passes + 1, drafted,
                    accepted)

        _, _, _, _, out, count, _, passes, drafted, accepted = jax.lax.while_loop(
            cond, body, state)
        return out, count, passes, drafted, accepted


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _leading_matches(drafts: jax.Array, greedy: jax.Array) -> jax.Array:
    """drafts [B, M] and the main model's argmax over the window greedy [B, M + 1] -> [B]:
    how many drafts, from the first, equal the main model's own next token."""
    matches = (drafts == greedy[:, :-1]).astype(jnp.int32)
    return jnp.sum(jnp.cumprod(matches, axis=1), axis=1)


def _write_at(out: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """out [B, N] with row b's slots start[b] .. start[b] + W - 1 set to new [B, W]."""
    def put(o, n, s):
        return jax.lax.dynamic_update_slice_in_dim(o, n, s, axis=0)

    return jax.vmap(put)(out, new, start)


def _until_stop(tokens: np.ndarray, stop: tuple[int, ...]) -> list[int]:
    """The tokens before the first stop token."""
    tokens = [int(t) for t in tokens]
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens
