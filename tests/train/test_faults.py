"""Faults injected on purpose: damaged checkpoints, altered data shards, NaN/inf steps and an
exploding learning rate; each is caught, named, and costs at most one checkpoint interval.
(SIGKILL at random moments: tests/train/test_kill_resume.py.)"""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanochat_jax.errors import CheckpointError, DataError, DivergenceError
from nanochat_jax.losses import Objective
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.train.checkpoint import checksums, load_run
from nanochat_jax.train.metrics import MetricWriter
from nanochat_jax.train.state import init_train_state
from nanochat_jax.train.step import make_train_step
from nanochat_jax.train.trainer import train

TINY = model_config("tiny", vocab_size=384, n_layers=2, seq_len=32)
TOKENS = jax.random.randint(jax.random.key(1), (4, 33), 0, TINY.vocab_size)  # [B, T+1]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return [(r["step"], r["loss/total"]) for r in _rows(workdir) if "loss/total" in r]


# --- checksums ---------------------------------------------------------------------------

def test_checksums_change_with_any_single_element_and_only_then():
    tree = {"w": jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4), "n": jnp.int32(7),
            "q": jnp.arange(10, dtype=jnp.int8), "b": jnp.ones(5, jnp.bfloat16)}
    before = checksums(tree)
    assert before == checksums(jax.tree.map(jnp.copy, tree))
    assert set(before) == {"w", "n", "q", "b"}
    for leaf, index in [("w", (1, 2, 3)), ("w", (0, 0, 0)), ("q", (9,)), ("b", (2,))]:
        x = tree[leaf]
        flipped = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16,
                                                   4: jnp.uint32}[x.dtype.itemsize])
        flipped = flipped.at[index].set(flipped[index] ^ 1)  # one bit
        changed = {**tree, leaf: jax.lax.bitcast_convert_type(flipped, x.dtype)}
        after = checksums(changed)
        assert after[leaf] != before[leaf]
        assert all(after[k] == before[k] for k in before if k != leaf)
    swapped = {**tree, "w": tree["w"].at[0, 0, 0].set(1.0).at[0, 0, 1].set(0.0)}
    assert checksums(swapped)["w"][1] != before["w"][1]  # the weighted sum sees order


# --- damaged checkpoints -------------------------------------------------------------------

def _state_files(step_dir):
    """The array data files of a checkpoint step, largest first."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                  recursive=True) if os.path.isfile(f)]
    return sorted(files, key=os.path.getsize, reverse=True)


def _flip_a_byte(step_dir):
    path = _state_files(step_dir)[0]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def _truncate(step_dir):
    path = _state_files(step_dir)[0]
    os.truncate(path, os.path.getsize(path) // 3)


def _delete_a_file(step_dir):
    os.remove(_state_files(step_dir)[0])


def _garble_the_sidecar(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write('{"config": {"mod')


DAMAGE = {"flipped byte": (_flip_a_byte, "is damaged: 1 of"),
          "truncated file": (_truncate, "cannot be read"),
          "deleted file": (_delete_a_file, "cannot be read"),
          "garbled sidecar": (_garble_the_sidecar, "has an unreadable sidecar")}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, make_small_config):
    """(workdir holding a 12-step run's checkpoints at 4 and 8 (and its metrics to 12: a
    resume rewinds them), that run's workdir, its config)."""
    c = make_small_config()
    straight = str(tmp_path_factory.mktemp("straight"))
    train(c, straight)
    partial = os.path.join(str(tmp_path_factory.mktemp("partial")), "run")
    shutil.copytree(straight, partial)  # as if it had stopped after step 8
    shutil.rmtree(os.path.join(partial, "checkpoints", "12"))
    return partial, straight, c


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_loaded(
        two_checkpoints, tmp_path, kind, capsys):
    partial, _, _ = two_checkpoints
    workdir = str(tmp_path / "run")
    shutil.copytree(partial, workdir)
    damage, message = DAMAGE[kind]
    damage(os.path.join(workdir, "checkpoints", "8"))
    _, state, meta = load_run(workdir)
    assert meta["step"] == int(state.step) == 4
    out = capsys.readouterr().out
    assert f"checkpoint step 8 {message}" in out and "skipped" in out
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))  # loading moves nothing
    with pytest.raises(CheckpointError, match="checkpoint step 8 in .* " + message.split(":")[0]):
        load_run(workdir, step=8)  # asked for by number: an error, not a silent fallback


@pytest.mark.slow
def test_training_resumes_past_a_cut_short_save_and_a_silently_corrupted_step(
        two_checkpoints, tmp_path, capsys):
    """On disk: what SIGKILL during an async save leaves (orbax renames a step into place
    only when complete: a half-written temporary directory), and a step 8 with a flipped
    bit that orbax reads back without complaint. The run deletes the first, catches the
    second by its checksums and sets it aside, and from step 4 rejoins the uninterrupted
    curve."""
    partial, straight, c = two_checkpoints
    workdir = str(tmp_path / "run")
    shutil.copytree(partial, workdir)
    half = os.path.join(workdir, "checkpoints", "12.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(workdir, "checkpoints", "8"), half)
    _truncate(half)
    os.remove(os.path.join(half, "commit_success.txt"))
    _flip_a_byte(os.path.join(workdir, "checkpoints", "8"))
    summary = train(c, workdir)
    out = capsys.readouterr().out
    assert "checkpoint step 8 is damaged: 1 of" in out and "resumed from" in out
    assert summary["start_step"] == 4 and summary["step"] == 12
    assert _losses(workdir) == _losses(straight)
    aside = glob.glob(os.path.join(workdir, "checkpoints-damaged", "8-*"))
    assert len(aside) == 1 and f"moved to {aside[0]}" in out
    assert not os.path.exists(half)


def test_no_intact_checkpoint_is_an_error_listing_every_step(two_checkpoints, tmp_path):
    partial, _, c = two_checkpoints
    workdir = str(tmp_path / "run")
    shutil.copytree(partial, workdir)
    _truncate(os.path.join(workdir, "checkpoints", "8"))
    _flip_a_byte(os.path.join(workdir, "checkpoints", "4"))
    with pytest.raises(CheckpointError, match="no intact checkpoint .*step 8 cannot be read.*"
                                              "step 4 is damaged"):
        train(c, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_checkpoints_from_before_the_skip_counters_still_load(two_checkpoints, tmp_path):
    """Format 1 (no counters, no checksums): restored with zero counters."""
    import orbax.checkpoint as ocp

    partial, _, _ = two_checkpoints
    config, state, meta = load_run(partial)
    old = {k: getattr(state, k) for k in ("step", "params", "opt_state", "rng")}
    meta = {k: v for k, v in meta.items() if k not in ("format", "checksums")}
    directory = tmp_path / "old" / "checkpoints"
    with ocp.CheckpointManager(str(directory)) as manager:
        manager.save(8, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                                meta=ocp.args.JsonSave(meta)))
    _, loaded, _ = load_run(str(tmp_path / "old"))
    assert int(loaded.step) == 8 and int(loaded.skipped_steps) == 0
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


# --- metrics after a crash -----------------------------------------------------------------

def test_resumed_metrics_drop_rows_after_the_checkpoint_and_a_torn_last_line(
        tmp_path, tensorboard_events):
    from tensorboardX.proto.event_pb2 import SessionLog

    writer = MetricWriter(str(tmp_path))
    for step in range(1, 7):
        writer.write(step, {"loss/total": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss/to')  # the kill came mid-line
    MetricWriter(str(tmp_path), resume_step=4).close()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]
    newest = max(glob.glob(str(tmp_path / "tb" / "events.out.tfevents*")), key=os.path.getmtime)
    starts = [e.step for e in tensorboard_events(newest)
              if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert starts == [5]  # TensorBoard hides the old file's steps >= 5




# --- data shards ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_corpus(tmp_path_factory, make_small_config):
    """(a corpus directory of small_config's data, the config)."""
    from nanochat_jax.data import corpus as corpus_lib
    from nanochat_jax.data.pipeline import corpus_spec

    c = make_small_config()
    directory = str(tmp_path_factory.mktemp("corpus") / "built")
    corpus_lib.build(corpus_spec(c), directory)
    return directory, c


@pytest.mark.parametrize("damage,message", [
    (lambda p: open(p, "r+b").write(b"\x07\x00"), "does not match its manifest hash"),
    (lambda p: os.truncate(p, 10), "is 10 bytes, the manifest says"),
    (os.remove, "is missing"),
])
def test_an_altered_data_shard_stops_the_run_before_training(built_corpus, tmp_path, damage,
                                                             message):
    directory, c = built_corpus
    c.data.corpus_dir = str(tmp_path / "corpus")
    shutil.copytree(directory, c.data.corpus_dir)
    shard = os.path.join(c.data.corpus_dir, "train_000.bin")
    damage(shard)
    with pytest.raises(DataError, match=f"data shard {shard} {message}.*delete "):
        train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# --- NaN / inf steps -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_non_finite_step_is_skipped_on_device_and_counted():
    model, tx = Transformer(TINY), optax.adamw(1e-3)
    step = make_train_step(model, tx, lambda _: 1e-3, Objective(pad_id=-1, vocab_chunk=8192))
    state, metrics = step(init_train_state(model, tx, 0, TINY.seq_len), TOKENS)
    assert float(metrics["training/skipped"]) == 0 and int(state.skipped_steps) == 0
    good = jax.device_get(state)
    poisoned = state.replace(params=jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan),
                                                 state.params))
    before = jax.device_get(poisoned)
    state, metrics = step(poisoned, TOKENS)
    assert np.isnan(float(metrics["loss/total"])) and float(metrics["training/skipped"]) == 1
    assert (int(state.step), int(state.skipped_steps), int(state.consecutive_skips)) == (2, 1, 1)
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((before.params, before.opt_state)), strict=True):
        if a.ndim == 0 and np.issubdtype(a.dtype, np.integer):
            assert int(a) == int(state.step)  # Adam's count keeps in step (schedules too)
        else:
            np.testing.assert_array_equal(a, b)  # params and moments: not updated
    state, metrics = step(state.replace(params=jax.device_put(good.params)), TOKENS)
    assert float(metrics["training/skipped"]) == 0
    assert (int(state.step), int(state.skipped_steps), int(state.consecutive_skips)) == (3, 1, 0)


@pytest.mark.slow
def test_an_exploding_learning_rate_stops_the_run_naming_the_steps_and_metric(
        two_checkpoints, tmp_path):
    """lr=1e30 from step 8 on: every update is inf, each is skipped; the third in a row
    stops the run, which keeps the checkpoint from before, intact."""
    partial, _, shared = two_checkpoints
    c = shared.copy_and_resolve_references()  # the module's other tests keep their lr
    workdir = str(tmp_path / "run")
    shutil.copytree(partial, workdir)
    c.training.max_consecutive_skips = 3
    c.optimizer.lr = 1e30
    with pytest.raises(DivergenceError, match=r"3 updates in a row were skipped for NaN/inf "
                       r"values \(steps 9-11, training.max_consecutive_skips=3\); at step 9: "
                       r".*training/update_norm=inf.*the newest checkpoint, step 8"):
        train(c, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    rows = [r for r in _rows(workdir) if r["step"] > 8 and "training/skipped_steps" in r]
    assert [r["training/skipped_steps"] for r in rows] == [1, 2, 3]
    assert not any("loss/total" in r for r in rows)  # nothing applied: no loss to average
    _, state, _ = load_run(workdir)
    assert int(state.step) == 8 and int(state.skipped_steps) == 0
