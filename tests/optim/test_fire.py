"""FIRE (docs/techniques.md#fire): nearest scaled isometry of `[in, out]` kernels, moment reset,
checkpoints."""

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from optax.contrib import MuonDimensionNumbers

from nanochat_jax.cli import fire as fire_command
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.params import is_hidden
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim import fire
from nanochat_jax.optim.fire import fire_params, isometry_error, nearest_isometry, reset_moments
from nanochat_jax.train.checkpoint import Checkpointer
from nanochat_jax.train.fire_checkpoint import fire_checkpoint
from nanochat_jax.train.setup import abstract_train_state
from nanochat_jax.train.trainer import train

CFG = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=48)
HIDDEN_KERNELS = ("attn/q", "attn/k", "attn/v", "attn/o", "ffn/w1", "ffn/w2", "ffn/w3")
# [in, out] shapes and Newton-Schulz iterations that converge for Gaussian matrices.
SHAPES = {"tall": ((64, 32), 30), "wide": ((32, 64), 30), "square": ((32, 32), 60)}


def _gaussian(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


@functools.cache
def _params():
    model = Transformer(CFG)
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, CFG.seq_len), jnp.int32))[
        "params"]


def _hidden_paths():
    return {f"block_{i}/{name}/kernel" for i in range(CFG.n_layers) for name in HIDDEN_KERNELS}


@pytest.mark.parametrize("kind", SHAPES)
def test_short_side_gram_is_d_out_over_d_in_times_identity(kind):
    """Tall [in, out]: W^T W = (d_out/d_in) I; wide: W W^T = (d_out/d_in) I."""
    (d_in, d_out), iters = SHAPES[kind]
    w = np.asarray(nearest_isometry(_gaussian((d_in, d_out)), iters), np.float64)
    gram = w.T @ w if d_in >= d_out else w @ w.T
    assert gram.shape == (min(d_in, d_out),) * 2
    assert_allclose(gram, d_out / d_in * np.eye(min(d_in, d_out)), atol=1e-4)
    assert float(isometry_error(jnp.asarray(w))) < 1e-4


@pytest.mark.parametrize("kind", SHAPES)
def test_singular_vectors_are_preserved(kind):
    """The result is sqrt(d_out/d_in) U V^T for W = U S V^T (Procrustes' nearest isometry)."""
    (d_in, d_out), iters = SHAPES[kind]
    w = _gaussian((d_in, d_out), seed=1)
    u, _, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    assert_allclose(nearest_isometry(w, iters), np.sqrt(d_out / d_in) * u @ vt, atol=1e-5)


@pytest.mark.parametrize("kind", SHAPES)
def test_idempotent_and_scale_invariant(kind):
    (d_in, d_out), iters = SHAPES[kind]
    once = nearest_isometry(_gaussian((d_in, d_out), seed=2), iters)
    assert_allclose(nearest_isometry(once, iters), once, atol=1e-5)
    assert_allclose(nearest_isometry(7.0 * _gaussian((d_in, d_out), seed=2), iters), once,
                    atol=1e-5)


def test_a_zero_matrix_stays_zero_and_non_matrices_are_refused():
    assert_array_equal(nearest_isometry(jnp.zeros((8, 4))), np.zeros((8, 4)))
    with pytest.raises(ValueError, match="2-D"):
        nearest_isometry(jnp.ones((4,)))


def test_fire_params_reinitialises_exactly_the_block_kernels():
    """q, k, v, o, w1-3 of every block become isometries; embedding, head, norms unchanged."""
    params = _params()
    fired = jax.jit(fire_params, static_argnames="iters")(params, iters=60)
    changed = set()
    for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                     jax.tree.leaves(fired), strict=True):
        chex.assert_trees_all_equal_shapes_and_dtypes(after, before)
        if not np.array_equal(before, after):
            changed.add(_path(path))
            assert float(isometry_error(after)) < 1e-4, _path(path)
    assert changed == _hidden_paths()
    assert {"embed/embedding", "lm_head", "final_norm/scale"} & changed == set()


def _muon():
    def dims(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: MuonDimensionNumbers(0, 1) if is_hidden(p, x) else None, params)
    return optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_reset_moments_zeroes_exactly_the_moments_of_reinitialised_leaves(name):
    params = _params()
    tx = optax.adamw(1e-3) if name == "adamw" else _muon()
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape), params)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    reset = reset_moments(state, params)

    hidden = _hidden_paths()
    zeroed = 0
    before = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, old), new in zip(before, jax.tree.leaves(reset), strict=True):
        p = _path(path)
        mirrors_hidden = any(p.endswith(h) for h in hidden) and old.shape != ()
        if mirrors_hidden:
            assert np.any(old != 0) and not np.any(new), p
            zeroed += 1
        else:
            assert_array_equal(new, old, err_msg=p)
            assert np.any(old != 0), p  # moments of other leaves were live, and are kept
    # Adam: mu and nu of each of the 14 kernels; Muon: its momentum (Adam's are MaskedNodes).
    assert zeroed == (2 if name == "adamw" else 1) * len(hidden)
    counts = [x for path, x in before if "count" in _path(path)]
    assert counts and all(int(c) == 1 for c in counts)


@pytest.mark.slow
def test_command_fires_a_checkpoint_into_a_new_run_that_resumes(small_config, tmp_path, capsys):
    c = small_config
    c.training.steps = 2
    run, out = tmp_path / "run", tmp_path / "fired"
    train(c, str(run))

    fire_command.main([f"--workdir={run}", f"--out={out}", "--iters=60"])
    assert "14 matrices re-initialised" in capsys.readouterr().out
    ckpt = Checkpointer(str(out / "checkpoints"), every=1, max_to_keep=None)
    try:
        assert ckpt.latest_step() == 2
        meta = ckpt.restore_meta(2)
        state = ckpt.restore(2, abstract_train_state(c))
    finally:
        ckpt.close()
    assert meta["fire"]["iters"] == 60 and meta["config"]["model"] == c.model.to_dict()
    kernels = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
               if is_hidden(path, x)]
    assert len(kernels) == 14
    assert max(float(isometry_error(x)) for _, x in kernels) < 1e-4
    zeroed_again = reset_moments(state.opt_state, state.params)  # their moments are already 0
    assert jax.tree.all(jax.tree.map(np.array_equal, zeroed_again, state.opt_state))

    c.training.steps = 4
    summary = train(c, str(out))
    assert summary["start_step"] == 2 and summary["step"] == 4
    assert np.isfinite(summary["loss/total"])


class _SubspaceState(NamedTuple):
    """Shaped like GaLore's state: params-shaped bases next to params-shaped moments."""

    projectors: Any
    mu: Any


def test_reset_moments_keeps_subspace_projectors():
    params = _params()
    ones = jax.tree.map(jnp.ones_like, params)
    reset = reset_moments(_SubspaceState(projectors=ones, mu=ones), params)
    assert jax.tree.all(jax.tree.map(np.array_equal, reset.projectors, ones))
    zeroed = {_path(p) for p, x in jax.tree_util.tree_flatten_with_path(reset.mu)[0]
              if not np.any(x)}
    assert zeroed == _hidden_paths()


def test_the_command_and_the_library_default_to_the_runs_iterations():
    """The command once defaulted to 10 iterations, where a 128x128 kernel is still far
    from an isometry; the run's default (base.py) is what every entry point uses."""
    import inspect

    from experiments.configs import base

    runs = base.get_config().optimizer.fire.iters
    assert fire.ITERS == runs
    for fn in (fire.nearest_isometry, fire.fire_params, fire.apply_fire,
               fire_checkpoint):
        assert inspect.signature(fn).parameters["iters"].default == runs
    assert fire_command.command_parser().parse_args(["--workdir=a", "--out=b"]).iters == runs
    assert float(isometry_error(nearest_isometry(_gaussian((128, 128))))) < 1e-3
    assert float(isometry_error(nearest_isometry(_gaussian((128, 128)), 10))) > 0.1
