"""train/step.py: the step is a module-level function jitted once by its caller, and the
kernel's tiles are tuned on concrete arrays before it is compiled."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.loading import load_config
from nanochat_jax.losses import Objective
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer
from nanochat_jax.ternary import kernel, tile_cache, tuning
from nanochat_jax.train.setup import setup
from nanochat_jax.train.state import init_train_state
from nanochat_jax.train.step import make_train_step, train_step, tune_kernel_tiles

OBJECTIVE = Objective(pad_id=-1, vocab_chunk=8192)


def _setup(impl="reference"):
    model = Transformer(model_config("tiny", vocab_size=384, n_layers=1, seq_len=16,
                                     kernel_backend=impl))
    tx = optax.sgd(0.1)
    return model, tx, init_train_state(model, tx, 0, 16)


@pytest.mark.slow
def test_make_train_step_returns_the_jitted_step_that_lowers_ahead_of_time():
    model, tx, state = _setup()
    step = make_train_step(model, tx, lambda _: 0.1, OBJECTIVE)
    abstract = jax.eval_shape(lambda: state)
    compiled = step.lower(abstract, jax.ShapeDtypeStruct((2, 17), jnp.int32)).compile()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 17)), jnp.int32)
    direct = jax.jit(functools.partial(train_step, model=model, tx=tx, lr_fn=lambda _: 0.1,
                                       objective=OBJECTIVE))(state, tokens)  # (no donation)
    new, metrics = compiled(state, tokens)
    assert int(new.step) == 1
    np.testing.assert_allclose(float(metrics["loss/total"]),
                               float(direct[1]["loss/total"]), rtol=1e-6)


@pytest.mark.slow
def test_kernel_tiles_are_tuned_on_concrete_arrays_before_the_step_compiles(monkeypatch,
                                                                             tmp_path):
    """As on a GPU/TPU (where `auto` compiles the kernel): an abstract trace leaves every
    product's shape pending with a default tiling, the tuner times them (interpret mode
    here), writes the cache, and the step then runs with the tuned tiles."""
    model, tx, state = _setup("interpret")
    monkeypatch.setattr(tile_cache, "_TUNED", {})
    monkeypatch.setattr(tile_cache, "_PENDING", {})  # what init traced
    assert tune_kernel_tiles(lambda: 0) == {}  # on the CPU nothing is tuned
    monkeypatch.setattr(kernel, "resolve_impl", lambda impl, platform=None: "pallas")
    step = make_train_step(model, tx, lambda _: 0.1, OBJECTIVE)
    cache = tmp_path / "tiles.json"
    said = []
    done = tune_kernel_tiles(step, state, jax.ShapeDtypeStruct((2, 17), jnp.int32),
                             cache_path=str(cache), say=said.append)
    # q, o (128 -> 128), k, v (128 -> 64), w1, w3 (128 -> 384), w2 (384 -> 128), 32 rows
    assert len(done) == 4 and tile_cache.pending() == [] and len(said) == 5
    assert {k: tuple(v) for k, v in json.loads(cache.read_text()).items()} == done
    _, metrics = step(state, jnp.zeros((2, 17), jnp.int32))
    assert np.isfinite(float(metrics["loss/total"])) and tile_cache.pending() == []


@pytest.mark.slow
@pytest.mark.parametrize("with_reference", [False, True])
def test_in_shardings_match_the_arguments_the_step_is_called_with(with_reference):
    from nanochat_jax.train import sharding
    from nanochat_jax.train.step import StepShardings

    model, tx, state = _setup()
    mesh = jax.make_mesh((1, 1, 1), sharding.AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    reference = model if with_reference else None
    step = make_train_step(model, tx, lambda _: 0.1,
                           Objective(pad_id=-1, vocab_chunk=8192,
                                     keep_ratio=0.5 if with_reference else None),
                           reference, shardings=StepShardings.on(mesh, state, state.params))
    extra = (jax.tree.map(jnp.copy, state.params),) if with_reference else ()
    _, metrics = step(state, jnp.zeros((2, 17), jnp.int32), *extra)
    assert np.isfinite(float(metrics["loss/total"]))


def test_on_a_pod_process_zero_tunes_and_every_process_adopts_its_tiles(monkeypatch):
    """Different tiles on different hosts would be different programs: only process 0
    times, the others take its choice (broadcast_one_to_all) without timing anything."""
    from nanochat_jax.train import step as step_lib

    model, tx, state = _setup("interpret")
    monkeypatch.setattr(tile_cache, "_TUNED", {})
    monkeypatch.setattr(tile_cache, "_PENDING", {})
    monkeypatch.setattr(kernel, "resolve_impl", lambda impl, platform=None: "pallas")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    timed = []
    monkeypatch.setattr(tuning, "tune_shape", lambda *a, **k: timed.append(a))
    sent = {}

    def from_process_zero(tiles):
        sent["shape"] = tiles.shape
        return np.tile(np.asarray([[32, 32, 128, 1, 4, 2]], np.int32), (tiles.shape[0], 1))

    monkeypatch.setattr(step_lib.multihost_utils, "broadcast_one_to_all", from_process_zero)
    step = make_train_step(model, tx, lambda _: 0.1, OBJECTIVE)
    chosen = tune_kernel_tiles(step, state, jax.ShapeDtypeStruct((2, 17), jnp.int32),
                               say=lambda _: None)
    assert timed == [] and sent["shape"] == (4, 6) and tile_cache.pending() == []
    assert set(chosen.values()) == {(32, 32, 128, 1, 4, 2)}
    assert all(tile_cache.tuned(k) == v for k, v in chosen.items())


def test_on_a_pod_process_zero_joins_the_broadcast_even_with_every_tile_cached(monkeypatch):
    """Each host has its own cache file and only process 0 tunes: on a restart process 0
    finds every tile cached while the others find none. Process 0 must still send its
    tiles (it used to return early, and the other hosts waited in the broadcast forever)."""
    from nanochat_jax.train import step as step_lib

    model, tx, state = _setup("interpret")
    monkeypatch.setattr(tile_cache, "_TUNED", {})
    monkeypatch.setattr(tile_cache, "_PENDING", {})
    monkeypatch.setattr(kernel, "resolve_impl", lambda impl, platform=None: "pallas")
    step = make_train_step(model, tx, lambda _: 0.1, OBJECTIVE)
    tokens = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    keys, pending = tile_cache.lookups_in(step, state, tokens)
    assert pending == keys
    cached = {k: tile_cache._PENDING[k][0].default(*tile_cache._PENDING[k][1:]) for k in keys}
    tile_cache.adopt(cached)  # what process 0's cache file gave it
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(tuning, "tune_shape", lambda *a, **k: pytest.fail("nothing to tune"))
    sent = []
    monkeypatch.setattr(step_lib.multihost_utils, "broadcast_one_to_all",
                        lambda tiles: sent.append(tiles) or tiles)
    chosen = tune_kernel_tiles(step, state, tokens, say=lambda _: None)
    (tiles,) = sent
    assert tiles.shape == (len(keys), 6) and len(keys) == 4
    assert [tuple(t) for t in tiles.tolist()] == [tuple(cached[k]) for k in keys]
    assert chosen == cached


@pytest.mark.slow
def test_bits_per_byte_counts_the_same_targets_above_and_below_the_line():
    """A BOS target stands for no bytes: its CE is in `eval/ce` (per token) but not in the
    bits/byte numerator, whose denominator cannot count it."""
    from nanochat_jax.train.step import eval_step

    model, _, state = _setup()
    bos = 1
    token_bytes = jnp.ones(384, jnp.int32).at[bos].set(0).at[0].set(0)  # 0: pad, 1: BOS
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(2, 384, (2, 17)), jnp.int32).at[:, 5].set(bos)
    out = eval_step(state.params, tokens, model=model, token_bytes=token_bytes, pad_id=0,
                    vocab_chunk=8192)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden, head = model.apply({"params": state.params}, inputs,
                               method=Transformer.hidden_and_head)
    logits = (hidden @ head).astype(jnp.float32)
    token_ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    text = targets != bos
    np.testing.assert_allclose(float(out["ce_sum"]), float(jnp.sum(token_ce)), rtol=1e-5)
    np.testing.assert_allclose(float(out["ce_text"]), float(jnp.sum(token_ce * text)),
                               rtol=1e-5)
    assert int(out["bytes"]) == int(jnp.sum(text)) == 2 * 16 - 2
    assert float(out["ce_text"]) < float(out["ce_sum"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "muon_8bit", "galore2_muon_8bit"])
def test_after_a_skipped_step_the_schedule_applies_the_logged_rate(name):
    """A poisoned first step under a warmup: the next update uses lr(1), the rate logged as
    `training/lr`, not lr(0) = 0 (the optimizers' counts stopped while state.step moved)."""
    from experiments.configs import base

    cfg = base.get_config().optimizer
    cfg.name, cfg.warmup_steps, cfg.int8.min_size, cfg.galore.rank = name, 4, 64, 8
    model = Transformer(model_config("tiny", vocab_size=384, n_layers=1, seq_len=16,
                                     kernel_backend="reference"))
    tx, lr_fn = build_optimizer(cfg, 100)
    state = init_train_state(model, tx, 0, 16)
    step = make_train_step(model, tx, lr_fn, OBJECTIVE)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 17)), jnp.int32)
    good = jax.tree.map(jnp.copy, state.params)
    poisoned = state.replace(params=jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan),
                                                 state.params))
    state, metrics = step(poisoned, tokens)
    assert float(metrics["training/skipped"]) == 1
    state, metrics = step(state.replace(params=good), tokens)
    assert float(metrics["training/skipped"]) == 0 and int(state.step) == 2
    counts = [int(x) for x in jax.tree.leaves(state.opt_state)
              if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)]
    assert counts and set(counts) == {2}  # every optimizer count is the state's step
    applied = [float(v) for path, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if "learning_rate" in jax.tree_util.keystr(path)]
    logged = float(metrics["training/lr"])
    assert logged == pytest.approx(float(lr_fn(1))) and logged > 0
    assert applied and applied[0] == pytest.approx(logged)


@pytest.mark.parametrize("name", ["tiny", "tiny:mtp", "e3:full", "e3:lion", "e3:galore2"])
def test_the_step_returns_a_state_of_the_types_it_took_so_it_compiles_once(name):
    """jit keys its cache on shapes, dtypes and weak types: a state leaf the step returns
    with another type (a weakly typed initial value, as mHC's maps once were, updated to a
    strong float32) makes the second step trace and compile the whole step again (it
    doubled e3:full's compile time)."""
    config = load_config(name)
    config.model.vocab_size = config.data.vocab_size = 512
    config.model.seq_len, config.model.n_layers = 16, 1
    built = setup(config, abstract=True)
    state, step = built.state, built.train_step
    new, _ = jax.eval_shape(step, state, jax.ShapeDtypeStruct((2, 17), jnp.int32))

    def types(tree):
        return jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), tree)

    assert types(new) == types(state)
