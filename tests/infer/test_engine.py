"""The generation engine: the KV-cache path computes the full forward's logits, speculative
decoding reproduces plain greedy decoding, and LoopLM early exit behaves as
docs/techniques.md#looplm says."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose

from nanochat_jax.errors import ConfigError
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.model.config import model_config
from nanochat_jax.model.kv_cache import KVCache, write_slots
from nanochat_jax.model.layers import cached_attention
from nanochat_jax.model.loop import early_exit_step
from nanochat_jax.model.packed import pack_params
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary import cpu_kernel, kernel, tile_cache, tuning
from nanochat_jax.ternary.packing import PackedTernary

PROMPTS = [[1, 5, 9, 3, 4], [1, 7], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@functools.cache
def _model(vocab: int = 64, seed: int = 0, **arch):
    """A small model in float32 on every platform (the checks below are fp32 tolerances;
    "auto" would be bf16 on a GPU/TPU)."""
    cfg = model_config("tiny", vocab_size=vocab, seq_len=64, d_model=32, n_layers=2,
                       n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype="float32", **arch)
    model = Transformer(cfg)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    return model, variables


def _greedy_reference(model, variables, prompts, n, loops=None):
    """Plain greedy decoding by the full forward pass over a fixed-length buffer (causal, so
    the logits at i depend only on tokens <= i): no cache involved, one compilation."""
    buf = np.zeros((len(prompts), 48), np.int32)
    lengths = np.array([len(p) for p in prompts])
    for b, p in enumerate(prompts):
        buf[b, :len(p)] = p
    logits_fn = jax.jit(lambda t: model.apply(variables, t, loops=loops))
    rows = np.arange(len(prompts))
    for i in range(n):
        logits = logits_fn(jnp.asarray(buf))
        buf[rows, lengths + i] = np.asarray(jnp.argmax(logits[rows, lengths + i - 1], -1))
    return [buf[b, lengths[b]:lengths[b] + n].tolist() for b in rows]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [{}, {"mhc_streams": 2}, {"loops": 3}, {"mtp_depth": 2}],
                         ids=["plain", "mhc", "looped", "mtp"])
def test_prefill_then_decode_gives_the_full_forward_logits(arch):
    model, variables = _model(**arch)
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, 64)
    full = model.apply(variables, tokens)  # [B, T, V]
    lengths = jnp.asarray([5, 8, 3])  # rows prefilled to different lengths, right-padded
    cache = KVCache.zeros(model.cfg, 3, 32)
    pos = jnp.broadcast_to(jnp.arange(8), (3, 8))
    head = model.apply(variables, method=lambda m: m._head())
    decode = jax.jit(functools.partial(model.apply, method=Transformer.decode))
    out = decode(variables, tokens[:, :8], pos, cache)
    for b, n in enumerate(lengths):
        assert_allclose(out.hidden[b, :n] @ head, full[b, :n], atol=2e-5)
    position, cache = lengths, out.cache
    for _ in range(4):  # one token per row, each at its own next position
        fed = jnp.take_along_axis(tokens, position[:, None], 1)
        out = decode(variables, fed, position[:, None], cache)
        want = jnp.take_along_axis(full, position[:, None, None], 1)[:, 0]
        assert_allclose(out.hidden[:, 0] @ head, want, atol=2e-5)
        position, cache = position + 1, out.cache


@pytest.mark.slow
def test_generate_and_stream_equal_full_forward_greedy_for_prompts_of_different_lengths():
    model, variables = _model()
    engine = Engine(model, variables)
    result = engine.generate(PROMPTS, Generation(max_new_tokens=12))
    want = _greedy_reference(model, variables, PROMPTS, 12)
    assert result.tokens == want
    streamed = [t for chunk in engine.stream(PROMPTS[2], Generation(max_new_tokens=12))
                for t in chunk]
    assert streamed == want[2]


def _trained_on_cycle(fit_adam, kind: str, cycle=(3, 7, 2, 9, 5), steps=150):
    """A model with MTP depth 2 trained for a moment on one repeating cycle of tokens, so its
    MTP drafts are mostly right and speculative decoding accepts them."""
    model, variables = _model(vocab=12, seed=3, mtp_depth=2, mtp_kind=kind)
    rows = np.stack([np.roll(np.tile(cycle, 8), -s)[:24] for s in range(len(cycle))])

    def loss(params):
        out = model.apply({"params": params}, jnp.asarray(rows[:, :-3]),
                          method=Transformer.forward)

        def ce(h, shift):
            return optax.softmax_cross_entropy_with_integer_labels(
                    h @ out.head, jnp.asarray(rows[:, shift:rows.shape[1] - 3 + shift])).mean()
        return ce(out.hidden[-1], 1) + ce(out.mtp_hidden[0], 2) + ce(out.mtp_hidden[1], 3)

    return model, {"params": fit_adam(loss, variables["params"], steps, 1e-2)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_speculative_greedy_output_equals_plain_greedy_token_for_token(kind, fit_adam):
    engine = Engine(*_trained_on_cycle(fit_adam, kind))
    prompts = [[3, 7, 2], [9, 5, 3, 7, 2, 9], [1, 4, 0, 9]]  # the last one leaves the cycle
    plain = engine.generate(prompts, Generation(max_new_tokens=24))
    spec = engine.generate(prompts, Generation(max_new_tokens=24, speculative=True))
    assert spec.tokens == plain.tokens
    assert plain.tokens[0][:5] == [9, 5, 3, 7, 2]  # it did learn the cycle
    assert spec.acceptance > 0.5, spec
    assert spec.main_passes <= plain.main_passes // 2, spec
    streamed = [t for chunk in engine.stream(prompts[2], Generation(max_new_tokens=24,
                                                                    speculative=True))
                for t in chunk]
    assert streamed == plain.tokens[2]


def test_stop_tokens_end_a_row_and_are_not_returned():
    model, variables = _model()
    engine = Engine(model, variables)
    free = engine.generate(PROMPTS, Generation(max_new_tokens=10)).tokens
    stop = free[0][3]
    stopped = engine.generate(PROMPTS, Generation(max_new_tokens=10, stop_tokens=(stop,)))
    for row, got in zip(free, stopped.tokens, strict=True):
        want = row[:row.index(stop)] if stop in row else row
        assert got == want
    assert len(stopped.tokens[0]) <= 3


@pytest.mark.slow
def test_sampling_is_reproducible_and_stream_matches_generate():
    model, variables = _model()
    engine = Engine(model, variables)
    gen = Generation(max_new_tokens=16, temperature=1.0, top_k=8, top_p=0.9)
    key = jax.random.key(7)
    a = engine.generate([PROMPTS[0]], gen, key).tokens[0]
    assert a == engine.generate([PROMPTS[0]], gen, key).tokens[0]
    assert a != engine.generate([PROMPTS[0]], gen, jax.random.key(8)).tokens[0]
    assert [t for chunk in engine.stream(PROMPTS[0], gen, key) for t in chunk] == a
    top1 = Generation(max_new_tokens=16, temperature=1.0, top_k=1)
    assert engine.generate(PROMPTS, top1, key).tokens == engine.generate(
        PROMPTS, Generation(max_new_tokens=16)).tokens  # top-1 sampling is greedy


def test_packed_weights_generate_what_the_latent_weights_do():
    model, variables = _model()
    gen = Generation(max_new_tokens=12)
    latent = Engine(model, variables, pack=False).generate(PROMPTS, gen).tokens
    assert Engine(model, pack_params(variables)).generate(PROMPTS, gen).tokens == latent
    assert Engine(model, variables).generate(PROMPTS, gen).tokens == latent  # packs itself


@pytest.mark.slow
def test_early_exit_threshold_zero_runs_one_loop_and_one_runs_them_all():
    model, variables = _model(loops=3)
    engine = Engine(model, variables)
    one_loop = _greedy_reference(model, variables, PROMPTS, 8, loops=1)
    assert engine.generate(PROMPTS, Generation(8, exit_threshold=0.0)).tokens == one_loop
    every = engine.generate(PROMPTS, Generation(8)).tokens
    assert engine.generate(PROMPTS, Generation(8, exit_threshold=1.0)).tokens == every


@pytest.mark.slow
def test_early_exit_picks_the_same_loop_as_the_full_forward():
    model, variables = _model(loops=3)
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 64)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    cache = KVCache.zeros(model.cfg, 2, 16)
    gates = model.apply(variables, tokens, method=Transformer.forward).exit_logits
    # the threshold may be traced: one compilation serves every q
    full = jax.jit(lambda q: model.apply(variables, tokens, exit_threshold=q,
                                         method=Transformer.hidden_and_head)[0])
    cached = jax.jit(lambda q: model.apply(variables, tokens, pos, cache, q,
                                           method=Transformer.decode))
    seen = set()
    for q in (0.3, 0.5, 0.7, 0.9):
        want, out = full(q), cached(q)
        assert_allclose(out.hidden, want, atol=1e-5)
        np.testing.assert_array_equal(out.exit_step, early_exit_step(gates, q))
        seen |= set(np.unique(out.exit_step).tolist())
    assert seen == {0, 1, 2}  # the thresholds reach every loop


def test_engine_rejects_what_it_cannot_do():
    model, variables = _model()
    engine = Engine(model, variables)
    with pytest.raises(ConfigError, match="mtp_depth 0"):
        engine.generate(PROMPTS, Generation(speculative=True))
    with pytest.raises(ConfigError, match="looped"):
        engine.generate(PROMPTS, Generation(exit_threshold=0.5))
    with pytest.raises(ConfigError, match="token ids"):
        engine.generate([[1, 64]])
    with pytest.raises(ConfigError, match="at least one token"):
        engine.generate([[]])
    with pytest.raises(ConfigError, match="greedy"):
        Generation(temperature=0.7, speculative=True)


@pytest.mark.slow
def test_cached_attention_equals_causal_attention_with_grouped_heads():
    """8 query heads on 2 KV heads, 5 new tokens per row, rows at different positions."""
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (2, 9, 8, 16))
    k, v = (jax.random.normal(key, (2, 9, 2, 16)) for key in keys[1:])
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, N, Dh]
    starts = jnp.asarray([4, 2])  # row b's new tokens sit at starts[b] .. starts[b] + 4
    cache = [write_slots(jnp.zeros((2, 2, 16, 16)), a[:, :4], jnp.zeros(2, jnp.int32))
             for a in (k, v)]  # the first four tokens, at slots 0..3 of both rows
    fed = [jnp.stack([a[0, 4:], a[1, 2:7]]) for a in (q, k, v)]  # what row b feeds
    positions = starts[:, None] + jnp.arange(5)[None, :]
    cache = [write_slots(c, a, starts) for c, a in zip(cache, fed[1:], strict=True)]
    got = cached_attention(fed[0], *cache, positions)
    # row 0 sees tokens 0..8 as in the causal reference; row 1 overwrote slots 2..6 with
    # tokens 2..6, so it is the causal attention over its first 7 tokens
    assert_allclose(got[0], want[0, 4:], atol=1e-6)
    want1 = jax.nn.dot_product_attention(q[1:, :7], k[1:, :7], v[1:, :7], is_causal=True)
    assert_allclose(got[1], want1[0, 2:7], atol=1e-6)


def test_a_decode_step_updates_the_cache_in_place():
    """No copy of a cache array in the compiled decode step: its work does not grow with the
    cache length beyond the attention's reads (the [R, L, ...] cache copied all of it)."""
    model, variables = _model(loops=2)
    engine = Engine(model, variables)
    compiled = engine.lower_decode_step(batch=1, length=256).compile().as_text()
    cache_shape = f"[1,{model.cfg.n_kv_heads},256,{model.cfg.head_dim}]"
    copies = [line for line in compiled.splitlines() if " copy(" in line and cache_shape in line]
    assert not copies, copies[:3]


def test_the_engine_packs_a_ternary_model_once_and_keeps_fake_quant_latent():
    model, variables = _model()
    assert "packed" in Engine(model, variables).variables
    assert "packed" not in Engine(model, variables, pack=False).variables
    fake = Transformer(dataclasses.replace(model.cfg, ternary_product="fake_quant"))
    assert "packed" not in Engine(fake, variables).variables


def test_the_engine_keeps_its_codes_as_cpu_tiles_on_a_cpu_with_the_kernel_else_as_i2():
    model, variables = _model()
    layouts = {p.layout for p in jax.tree.leaves(
        Engine(model, variables).variables["packed"],
        is_leaf=lambda x: isinstance(x, PackedTernary))}
    native = kernel.target_platform() == "cpu" and cpu_kernel.available()
    assert layouts == ({"cpu_tiles"} if native else {"i2"})


def test_the_engine_tunes_the_kernel_for_its_shapes_before_compiling_them(monkeypatch):
    """Where the kernel compiles (GPU/TPU; here `resolve_impl` says so), the engine traces
    its prefill and decode loop abstractly and tunes the products found pending, once per
    prompt and cache shape, before they compile; on a CPU it tunes nothing."""
    model, variables = _model()
    tuned = []
    monkeypatch.setattr(tuning, "tune_pending",
                        lambda keys=None, **_: tuned.append(keys or tile_cache.pending()) or {})
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)  # I2 codes, the kernel's
    gen = Generation(max_new_tokens=3)
    monkeypatch.setattr(kernel, "resolve_impl", lambda impl, platform=None: "reference")
    Engine(model, variables).generate([[1, 5, 9]], gen)  # as on a CPU
    assert tuned == []
    monkeypatch.setattr(kernel, "resolve_impl", lambda impl, platform=None: "pallas")
    monkeypatch.setattr(tile_cache, "_PENDING", {})
    engine = Engine(model, variables)
    engine.generate([[1, 5, 9]], gen)
    engine.generate([[1, 7, 2, 4]], gen)  # the same bucketed shapes: nothing new to tune
    assert len(tuned) == 1
    rows = {key.split("|")[2] for key in tuned[0]}  # kind|lowering|m..|k4..|n..|dtype
    assert rows == {"m64", "m1"}  # the prefill's 64 bucketed rows and one decode row
    engine.generate([[1, 5, 9], [1, 7]], gen)  # two rows: new shapes
    assert len(tuned) == 2
