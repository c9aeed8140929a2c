"""The command line: config names and overrides are checked before any compute."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO})


def test_unknown_config_name_lists_the_choices():
    out = _run("--config=tinny")
    assert out.returncode != 0
    assert "unknown config 'tinny'" in out.stderr and "did you mean 'tiny'" in out.stderr
    assert "e3_muon" in out.stderr and "base" in out.stderr


def test_config_families_take_variants_and_the_old_names_still_resolve():
    from experiments.configs.loading import load_config, run_name

    assert load_config("tiny:rust,gguf").to_dict() == load_config("tiny_rust_gguf").to_dict()
    assert load_config("e3:full,seed").to_dict() == load_config("e3_full:seed").to_dict()
    gguf = load_config("tiny:rust,gguf")
    assert (gguf.model.preset, gguf.data.source, gguf.model.vocab_size) == (
        "tiny256", "rust-src", 8192)
    assert run_name("tiny:rust,gguf") == run_name("tiny_rust_gguf") == "tiny_rust_gguf"
    assert run_name("e3_full:seed") == "e3_full_seed"


def test_unknown_variant_lists_the_family_variants():
    out = _run("--config=tiny:rust,ggfu")
    assert out.returncode != 0
    assert "unknown tiny variant(s) 'ggfu'" in out.stderr and "rust, gguf, mtp" in out.stderr
    out = _run("--config=e3:muon,lion")
    assert out.returncode != 0 and "one optimizer arm" in out.stderr


def test_an_optimizer_field_lives_in_its_optimizers_group():
    """`optimizer.galore_rank` became `optimizer.galore.rank`: the old spelling is refused
    with the group's fields listed."""
    out = _run("--config=e3:galore2", "--config.optimizer.galore_rank=64")
    assert out.returncode != 0
    assert "config.optimizer has no field 'galore_rank'" in out.stderr
    assert "galore" in out.stderr and "muon" in out.stderr


def test_misspelt_override_names_the_field_and_the_options():
    out = _run("--config=tiny", "--config.optimizer.lrr=0.1")
    assert out.returncode != 0
    assert "config.optimizer has no field 'lrr'" in out.stderr
    assert "did you mean 'lr'" in out.stderr and "weight_decay" in out.stderr


def test_override_of_wrong_type_is_rejected():
    out = _run("--config=tiny", "--config.training.steps=many")
    assert out.returncode != 0 and "steps" in out.stderr


def test_bad_value_fails_before_training_with_a_clear_message(tmp_path):
    out = _run("--config=tiny", "--config.optimizer.name=sgdd", f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert "unknown optimizer.name 'sgdd'" in out.stderr and "muon" in out.stderr


@pytest.mark.parametrize("overrides,message", [
    (["--config.model.n_heads=3"], "model.d_model=128 is not divisible by model.n_heads=3"),
    (["--config.mesh.data=3"], "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices but 1"),
    (["--config.model.vocab_size=100"],
     "model.vocab_size=100 is smaller than the tokenizer's data.vocab_size=263"),
    (["--config.data.source=/no/such/corpus"], "data source '/no/such/corpus' is not a named"),
    (["--config.training.grad_accum=3"], "data.batch_size=16 must be a multiple of mesh.data"),
    (["--config.model.remat=some"], "unknown model.remat 'some': choose one of none, full"),
    (["--config.model.fp4_backward=fp8"], "unknown model.fp4_backward 'fp8'"),
    (["--config.model.compute_dtype=float16"], "unknown model.compute_dtype 'float16'"),
])
def test_impossible_settings_fail_with_one_message_before_training(tmp_path, overrides,
                                                                    message):
    out = _run("--config=tiny", *overrides, f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and message in out.stderr
    assert "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing was trained


@pytest.mark.parametrize("overrides,message", [
    (["--config.data.batch_size=0"], "data.batch_size must be > 0, got 0"),
    (["--config.data.vocab_size=10"], "data.vocab_size=10 is below 263"),
    (["--config.collider.enabled=True", "--config.collider.keep_ratio=0"],
     "collider.keep_ratio must be in (0, 1], got 0"),
    (["--config.optimizer.lr=-1"], "optimizer.lr must be > 0, got -1"),
    (["--config.mtp.enabled=True", "--config.mtp.depth=0"],
     "mtp.enabled=True with mtp.depth=0"),
    (["--config.training.steps=abc"], "flag --config.training.steps=abc: invalid literal"),
    (["--config.model.ternary=False", "--config.model.fp4_backward=nvfp4",
      "--config.collider.enabled=True"], "Collider's filtered backward and an FP4 backward"),
    (["--config.model.fp4_backward=nvfp4"], "only non-ternary matmul is the LM head"),
    (["WORKDIR_IS_A_FILE"], "is a file, not a directory"),
])
def test_bad_input_is_one_error_line_and_leaves_nothing_behind(tmp_path, overrides, message):
    """What a new user tried: each refused before any data, workdir or checkpoint manager."""
    workdir = tmp_path / "run"
    if overrides == ["WORKDIR_IS_A_FILE"]:
        workdir.write_text("notes")
        overrides = []
    out = _run("--config=tiny", *overrides, f"--workdir={workdir}", timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[-1]]
    assert out.stderr.strip().startswith("error: ") and message in out.stderr, out.stderr
    assert workdir.is_file() or not workdir.exists()  # nothing made, nothing trained


@pytest.mark.slow
def test_runner_trains_and_writes_its_workdir(tmp_path):
    out = _run("--config=tiny", "--config.training.steps=3", "--config.training.log_every=1",
               "--config.data.max_bytes=300000", "--config.training.peak_flops=1e11",
               "--config.model.ternary=False", f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "final: step 3" in out.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2, 3]
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    again = _run("--config=tiny", "--config.training.steps=3", "--config.data.max_bytes=300000",
                 "--config.training.peak_flops=1e11", "--config.model.ternary=False",
                 f"--workdir={tmp_path}")
    assert again.returncode == 0 and "resumed" in again.stdout


@pytest.mark.slow
def test_a_scanned_galore_run_finishes_under_xlas_concurrent_cpu_scheduler(tmp_path):
    """The scanned stack's GaLore projectors were one vmapped randomized SVD per layer;
    under XLA:CPU's concurrency-optimized scheduler (training.cpu_schedule=concurrency, and
    any in-process `train()` that does not set XLA_FLAGS first) the step then waited
    forever at 0% CPU after its first dispatch. Now a `lax.map` over the layers."""
    try:
        out = _run("--config=tiny", "--config.training.steps=2", "--config.training.log_every=1",
                   "--config.data.max_bytes=300000", "--config.training.peak_flops=1e11",
                   "--config.model.n_layers=2", "--config.model.scan_layers=True",
                   "--config.optimizer.name=galore2", "--config.optimizer.galore.rank=32",
                   "--config.training.cpu_schedule=concurrency", f"--workdir={tmp_path}",
                   timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the scanned GaLore run hung (no step in 150 s)")
    assert out.returncode == 0 and "final: step 2" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("command,message", [
    (["nanochat_jax.cli.export_gguf", "--checkpoint=/no/run", "--out=OUT/m.gguf"],
     "no checkpoints in /no/run: train a run there first"),
    (["nanochat_jax.cli.export_gguf", "--checkpoint=/no/run", "--out=OUT/m.gguf", "--type=q4_0"],
     "argument --type: invalid choice: 'q4_0'"),
    (["nanochat_jax.cli.export_hf", "--checkpoint=/no/run", "--out=OUT"], "no checkpoints in"),
    (["nanochat_jax.cli.eval", "--checkpoint=/no/run"], "no checkpoints in /no/run"),
    (["nanochat_jax.cli.chat", "--checkpoint=/no/run", "--prompt=fn"], "no checkpoints in"),
    (["nanochat_jax.cli.fire", "--workdir=/no/run", "--out=OUT"], "no checkpoints in"),
    (["nanochat_jax.cli.corpus", "--source=/no/such", "--out=OUT"],
     "data source '/no/such' is not a named source"),
])
def test_bad_command_lines_of_the_other_tools_give_one_message(tmp_path, command, message):
    """(A GGUF export of a model llama.cpp cannot run: tests/export/test_gguf.py.)"""
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode != 0
    assert "error: " in out.stderr.strip().splitlines()[-1] and message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_resuming_with_another_tokenizer_is_refused_from_the_sidecar(trained_run):
    """The run's own settings but another BPE size: refused before data or model."""
    workdir, _, _ = trained_run
    out = _run("--config=tiny", "--config.model.n_layers=2", "--config.model.seq_len=64",
               "--config.mtp.enabled=True", "--config.data.max_bytes=600000",
               "--config.data.vocab_size=300", f"--workdir={workdir}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {workdir} was trained on a corpus and tokenizer built with other data "
        f"settings (saved, configured): {{'data.vocab_size': (263, 300)}}; resuming would "
        f"not continue the same run: use the saved settings or a new --workdir")
    assert "model:" not in out.stdout


def test_an_altered_data_shard_is_named_before_the_model_is_built(tmp_path):
    from experiments.configs import tiny
    from nanochat_jax.data import corpus as corpus_lib
    from nanochat_jax.data.pipeline import corpus_spec

    config = tiny.get_config()
    config.data.max_bytes = 300_000
    corpus = tmp_path / "corpus"
    corpus_lib.build(corpus_spec(config), str(corpus))
    with open(corpus / "val_000.bin", "r+b") as f:
        f.write(b"\x00\x01")
    out = _run("--config=tiny", "--config.data.max_bytes=300000",
               f"--config.data.corpus_dir={corpus}", f"--workdir={tmp_path / 'run'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: data shard {corpus / 'val_000.bin'} does not match its manifest hash")
    assert "model:" not in out.stdout


def test_the_commands_that_take_a_config_share_one_config_flag():
    """experiments.run and experiments.compile both define `--config` (absl refuses a flag
    defined twice): one process can import both, as a notebook or a test does."""
    out = subprocess.run([sys.executable, "-c", "import experiments.run, experiments.compile"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
