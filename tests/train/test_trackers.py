"""Weights & Biases logging: the same tags as TensorBoard, offline without a network, and a
resumed run continues the W&B run whose id its checkpoint keeps."""

import glob
import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from nanochat_jax.errors import ConfigError
from nanochat_jax.train import trackers
from nanochat_jax.train.checkpoint import Checkpointer
from nanochat_jax.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _wandb(monkeypatch, tmp_path):
    """wandb, with its settings, cache and data directories in tmp_path."""
    wandb = pytest.importorskip(
        "wandb", reason="wandb is not installed (pip install -e '.[trackers]'; .ci/run does)")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb


def _history(run_dir) -> dict[int, dict[str, float]]:
    """step -> the metrics an offline W&B run logged there, read from its run-ID.wandb file
    (a LevelDB-format log of `wandb_internal_pb2.Record`s: 32 KiB blocks, each record in
    chunks with a 7-byte header: crc32, length, type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4)."""
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data, block, pos, chunks, records = open(path, "rb").read(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(chunks)
            chunks = b""
    history = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            step = int(row.pop("_step", record.history.step.num))
            history.setdefault(step, {}).update({k: v for k, v in row.items()
                                                 if not k.startswith("_")})
    return history


def _runs(workdir, run_id) -> list[str]:
    """The offline W&B run directories of `run_id`, oldest first (one per session)."""
    return sorted(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}")))


def _as_logged(rows) -> dict[int, dict[str, float]]:
    """metrics.jsonl rows merged per step (as W&B merges the rows of one step)."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    return out


def _sidecar(workdir) -> dict:
    """The newest checkpoint's sidecar."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 4, 3)
    try:
        return ckpt.newest_meta()
    finally:
        ckpt.close()


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_auto_mode_is_online_only_when_the_wandb_server_answers(monkeypatch):
    class Answer:
        def close(self):
            pass

    def refuse(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert trackers.resolve_mode("auto") == "offline"
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Answer())
    assert trackers.resolve_mode("auto") == "online"
    assert trackers.resolve_mode("offline") == "offline"  # explicit modes are kept


def test_a_bad_logging_mode_is_refused_before_any_work(small_config, tmp_path):
    small_config.logging.mode = "cloud"
    with pytest.raises(ConfigError, match="logging.mode"):
        train(small_config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _run(workdir, steps, env):
    """`python -m experiments.run` (the tiny test run) with W&B logging offline."""
    args = ["--config=tiny", "--config.model.n_layers=2", "--config.model.seq_len=64",
            "--config.data.batch_size=8", "--config.data.max_bytes=600000",
            "--config.training.log_every=1", "--config.training.eval_every=3",
            "--config.training.eval_batches=2", "--config.training.peak_flops=1e11",
            "--config.optimizer.warmup_steps=2", "--config.checkpoint.every=3",
            f"--config.training.steps={steps}", "--config.logging.wandb=True",
            "--config.logging.mode=offline", f"--workdir={workdir}"]
    out = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_wandb_logs_the_tensorboard_tags_and_a_resumed_run_continues_it(tmp_path,
                                                                        monkeypatch):
    _wandb(monkeypatch, tmp_path)
    env = {**os.environ, "PYTHONPATH": REPO}
    workdir = str(tmp_path / "run")
    out = _run(workdir, 6, env)
    run_id = _sidecar(workdir)["trackers"]["wandb_id"]
    assert f"wandb: run {run_id} (offline)" in out
    [first] = _runs(workdir, run_id)
    logged = _as_logged(_rows(workdir))
    history = _history(first)
    assert sorted(history) == list(range(7))  # the eval at 0, then steps 1-6
    for step, metrics in logged.items():  # every TensorBoard tag, same name, same value
        assert history[step] == pytest.approx(metrics, rel=1e-6), step

    out = _run(workdir, 12, env)  # the same run, resumed from step 6 and taken to 12
    assert f"resumed from {workdir} at step 6" in out and f"wandb: run {run_id}" in out
    first, second = _runs(workdir, run_id)  # a second session of the same W&B run
    resumed = _sidecar(workdir)
    assert resumed["step"] == 12 and resumed["trackers"]["wandb_id"] == run_id
    history, logged = _history(second), _as_logged(_rows(workdir))
    assert sorted(history) == list(range(7, 13))
    for step in range(7, 13):
        assert history[step] == pytest.approx(logged[step], rel=1e-6), step
