"""End-to-end: the runner trains for real, logs, checkpoints, and resumes exactly."""

import glob
import json
import os
import signal

import jax
import pytest

from nanochat_jax.data.loader import BatchSource
from nanochat_jax.errors import CheckpointError, ConfigError
from nanochat_jax.eval.code import training_evaluators
from nanochat_jax.eval.sandbox import rustc_available
from nanochat_jax.model.params import is_hidden
from nanochat_jax.optim.fire import isometry_error
from nanochat_jax.train.checkpoint import Checkpointer
from nanochat_jax.train.schedule import Hook
from nanochat_jax.train.setup import abstract_train_state
from nanochat_jax.train.trainer import train

TB_TAGS = ("loss/total", "loss/ce", "training/entropy", "training/lr", "training/grad_norm",
           "throughput/tokens_per_sec", "throughput/mfu", "memory/params_bytes",
           "memory/opt_state_bytes")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tensorboard_tags(events) -> set[str]:
    """Scalar tags of TensorBoard events (the conftest `tensorboard_events` reader)."""
    return {v.tag for event in events for v in event.summary.value}


def _train_losses(workdir):
    return [(r["step"], r["loss/total"]) for r in _rows(workdir) if "loss/total" in r]


@pytest.mark.slow
def test_tiny_config_learns_real_text(small_config, tmp_path):
    """Validation loss falls well below its starting value (ln 384 ~ 5.95 nats at init)."""
    c = small_config
    c.training.steps = 150
    c.training.log_every = 10
    c.training.eval_every = 150
    c.checkpoint.every = 50
    c.checkpoint.max_to_keep = 2
    summary = train(c, str(tmp_path))
    evals = [r["eval/ce"] for r in _rows(tmp_path) if "eval/ce" in r]
    assert evals[0] > 5.0
    assert evals[-1] < 0.6 * evals[0], evals
    assert summary["eval/bpb"] < 0.6 * evals[0] / 0.693
    assert set(TB_TAGS) <= set().union(*_rows(tmp_path))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["100", "150"]


@pytest.mark.slow
def test_interrupted_muon_run_resumes_the_same_loss_curve(small_config, tmp_path,
                                                          monkeypatch):
    """SIGTERM mid-run saves a checkpoint; re-running continues the uninterrupted curve, Muon's
    momentum included. (AdamW, SIGKILL and SIGINT through the command: test_kill_resume.py.)"""
    small_config.optimizer.name = "muon"
    small_config.optimizer.lr = 0.02
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(small_config, str(straight))

    original_batch = BatchSource.batch

    def batch_then_preempt(self, step):
        if self.shuffle and step == 6:  # the prefetch thread is a few steps ahead
            os.kill(os.getpid(), signal.SIGTERM)
        return original_batch(self, step)

    with monkeypatch.context() as m:
        m.setattr(BatchSource, "batch", batch_then_preempt)
        first = train(small_config, str(resumed))
    stopped = first["step"]
    assert first["interrupted"] and 0 < stopped < 12
    assert str(stopped) in os.listdir(resumed / "checkpoints")
    second = train(small_config, str(resumed))
    assert second["start_step"] == stopped and second["step"] == 12
    assert _train_losses(resumed) == _train_losses(straight)


@pytest.mark.slow
def test_resuming_with_a_different_model_is_refused(small_config, tmp_path):
    small_config.training.steps = 1
    train(small_config, str(tmp_path))
    small_config.model.d_ff = 256
    with pytest.raises(CheckpointError, match="different model"):
        train(small_config, str(tmp_path))
    small_config.model.d_ff = None
    small_config.loop.enabled = True  # the architecture changed through another group:
    small_config.loop.max_loops = 2  # refused from the sidecar, before any array is read
    with pytest.raises(CheckpointError, match="'loops': \\(1, 2\\)"):
        train(small_config, str(tmp_path))


@pytest.mark.slow
def test_resuming_on_different_data_is_refused(small_config, tmp_path):
    small_config.training.steps = 1
    train(small_config, str(tmp_path))
    small_config.data.max_bytes = 500_000  # another corpus, same tokenizer settings
    with pytest.raises(CheckpointError, match="'data.max_bytes': \\(600000, 500000\\)"):
        train(small_config, str(tmp_path))


def test_resuming_on_a_rebuilt_corpus_with_other_content_is_refused(small_config, tmp_path):
    """Same data settings, other files: caught by the corpus content hash."""
    source = tmp_path / "src"
    source.mkdir()
    for i in range(40):
        (source / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 200)
    c = small_config
    c.data.source, c.data.extensions, c.data.max_bytes = str(source), (".py",), 0
    c.training.steps, c.data.corpus_dir = 1, str(tmp_path / "corpus_a")
    train(c, str(tmp_path / "run"))
    (source / "m0.py").write_text("def changed():\n    pass\n" * 300)
    c.data.corpus_dir = str(tmp_path / "corpus_b")
    with pytest.raises(CheckpointError, match="corpus_sha256"):
        train(c, str(tmp_path / "run"))


@pytest.mark.slow
def test_a_corpus_dir_built_with_other_settings_is_refused(small_config, tmp_path):
    small_config.training.steps = 1
    small_config.data.corpus_dir = str(tmp_path / "corpus")
    train(small_config, str(tmp_path / "run"))  # builds the corpus there
    small_config.data.val_fraction = 0.1
    with pytest.raises(ConfigError, match="val_fraction"):
        train(small_config, str(tmp_path / "run2"))


@pytest.mark.slow
@pytest.mark.skipif(not glob.glob("/usr/src/rustc-*") or not rustc_available(),
                    reason="needs Debian's rust-src and rustc (apt-get install rust-src "
                           "rustc); .ci/run installs them")
def test_tiny_model_learns_the_real_rust_corpus_and_logs_code_evals(small_rust_config,
                                                                      tmp_path,
                                                                      tensorboard_events):
    c = small_rust_config
    c.training.steps = 150
    c.training.log_every = 10
    c.training.eval_every = 150
    c.training.eval_batches = 4
    c.training.code_eval_every = 75
    c.training.code_eval_max_new_tokens = 24
    c.optimizer.warmup_steps = 5
    with pytest.raises(ConfigError, match="needs the code evaluator"):  # the trainer alone
        train(c, str(tmp_path))
    train(c, str(tmp_path), training_evaluators(c))  # what experiments.run passes
    evals = [r["eval/ce"] for r in _rows(tmp_path) if "eval/ce" in r]
    assert evals[-1] < 0.8 * evals[0], evals  # ln(1024) = 6.9 at init
    code = [r for r in _rows(tmp_path) if "eval/compile_rate" in r]
    assert [r["step"] for r in code] == [75, 150]
    assert all(0 <= r["eval/compile_rate"] <= 1 and 0 <= r["eval/pass_rate"] <= 1
               for r in code)
    assert {"eval/compile_rate", "eval/pass_rate", "eval/pass_at_1"} <= _tensorboard_tags(
        tensorboard_events(tmp_path / "tb"))


@pytest.mark.slow
def test_fire_step_reinitialises_the_hidden_matrices_once(small_config, tmp_path, capsys):
    """optimizer.fire.step reaches FIRE: with a negligible LR afterwards, the saved hidden
    matrices are still isometries while the embedding is untouched. FIRE at a launch's last
    step is saved with it: the next launch, resumed there, does not apply it again."""
    c = small_config
    c.training.steps = 3
    c.optimizer.fire.step = 3
    c.optimizer.fire.iters = 60
    c.optimizer.lr = 1e-12
    c.optimizer.grad_clip = 0.0
    train(c, str(tmp_path))
    assert capsys.readouterr().out.count("FIRE re-initialised") == 1
    c.training.steps = 4
    train(c, str(tmp_path))
    out = capsys.readouterr().out
    assert "resumed from" in out and "FIRE re-initialised" not in out
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), 4, 3)
    state = ckpt.restore(4, abstract_train_state(c))
    ckpt.close()
    kernels = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
               if is_hidden(p, x)]
    assert len(kernels) == 2 * 7
    assert max(float(isometry_error(k)) for k in kernels) < 1e-3
    assert float(isometry_error(state.params["embed"]["embedding"])) > 0.1


@pytest.mark.slow
def test_research_code_adds_its_own_hooks_to_the_schedule(small_config, tmp_path):
    """`train(..., hooks=[Hook(action, every=N)])`: the action sees every N-th step's state
    (and the last one's); a state a hook returns is the one the next hook, the next step and
    the step's checkpoint get."""
    c = small_config
    c.training.steps = 5
    seen = []

    def zero_the_embedding(step, state):
        params = {**state.params, "embed": {"embedding": 0 * state.params["embed"]["embedding"]}}
        return state.replace(params=params)

    def record(step, state):
        seen.append((step, int(state.step),
                     float(jax.numpy.abs(state.params["embed"]["embedding"]).max())))

    c.checkpoint.every = 4
    summary = train(c, str(tmp_path), hooks=[Hook(zero_the_embedding, at=(4,)),
                                             Hook(record, every=2)])
    assert summary["step"] == 5
    assert [(step, at) for step, at, _ in seen] == [(2, 2), (4, 4), (5, 5)]
    assert seen[0][2] > 0 and seen[1][2] == 0 and seen[2][2] > 0  # trained on from zero
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), 4, 3)
    saved = ckpt.restore(4, abstract_train_state(c))  # saved after its step's hooks
    ckpt.close()
    assert float(jax.numpy.abs(saved.params["embed"]["embedding"]).max()) == 0


@pytest.mark.slow
def test_profile_steps_trace_exactly_those_steps_each_annotated(small_config, tmp_path,
                                                                 capsys):
    c = small_config
    c.training.steps = 4
    c.training.profile_steps = "2,2"
    train(c, str(tmp_path))
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1
    annotated = set()
    for plane in jax.profiler.ProfileData.from_file(traces[0]).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "train":
                    annotated.add(dict(event.stats)["step_num"])
    assert annotated == {2, 3}
    assert "profile of steps 2..3 written to" in capsys.readouterr().out


@pytest.mark.parametrize("setting", ["5", "a,b", "0,2", "3,5"])
def test_bad_profile_steps_are_refused_before_any_work(small_config, tmp_path, setting):
    small_config.training.steps = 6
    small_config.training.profile_steps = setting
    with pytest.raises(ConfigError, match="training.profile_steps"):
        train(small_config, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_e3_full_trains_with_every_feature_and_logs_their_tags(small_e3_full_config, tmp_path,
                                                               tensorboard_events):
    """MTP + LoopLM + mHC + Collider + GaLore 2 / 8-bit Muon: the loss falls; the feature
    tags are in TensorBoard."""
    c = small_e3_full_config
    c.loop.max_loops = 2  # (e3:full's 4 loops compile 1.6x as long: every loop is unrolled)
    c.training.steps = 40
    c.training.eval_every = 20
    c.checkpoint.every = 40
    train(c, str(tmp_path))
    evals = [r["eval/ce"] for r in _rows(tmp_path) if "eval/ce" in r]
    # 6.94 -> 6.15 (ratio 0.887, as with 4 loops; 6.01 with the first e3_full config, 5f44403)
    assert evals[-1] < 0.9 * evals[0], evals  # (ln 1024 = 6.93)
    tags = _tensorboard_tags(tensorboard_events(tmp_path / "tb"))
    assert {"loss/mtp", "loss/mtp/depth1", "loss/loop_exit", "loop/mean_exit_step",
            "mhc/composite_gain", "collider/keep_ratio", "eval/ce"} <= tags, sorted(tags)
    exits = [r["loop/mean_exit_step"] for r in _rows(tmp_path) if "loop/mean_exit_step" in r]
    assert all(1.0 <= e <= c.loop.max_loops for e in exits)


@pytest.mark.slow
def test_collider_with_a_reference_model_trains_on_excess_loss(small_config, tmp_path):
    """Rho-1 scoring: a short run is the reference for a filtered run on the same data."""
    c = small_config
    c.training.steps = 6
    train(c, str(tmp_path / "reference"))
    c.collider.enabled = True
    c.collider.keep_ratio = 0.5
    c.collider.score = "excess_loss"
    c.collider.reference = str(tmp_path / "reference")
    c.training.steps = 12
    train(c, str(tmp_path / "filtered"))
    rows = _rows(tmp_path / "filtered")
    assert all(r["collider/keep_ratio"] == 0.5 for r in rows if "collider/keep_ratio" in r)
    evals = [r["eval/ce"] for r in rows if "eval/ce" in r]
    assert evals[-1] < evals[0]


def test_collider_config_errors_come_before_any_work(small_config, tmp_path):
    c = small_config
    c.collider.enabled = True
    c.collider.score = "perplexity"
    with pytest.raises(ConfigError, match="unknown collider.score 'perplexity'"):
        train(c, str(tmp_path / "a"))
    c.collider.score = "excess_loss"
    with pytest.raises(ConfigError, match="needs collider.reference"):
        train(c, str(tmp_path / "b"))
