"""Model FLOPs per token (the MFU numerator), byte counting, and the metrics writer."""

import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import pytest

from nanochat_jax.model.config import model_config
from nanochat_jax.optim.memory import tree_bytes
from nanochat_jax.train.metrics import flops_per_token


def test_flops_per_token_of_the_plain_model_is_the_palm_count():
    c = model_config("125m", vocab_size=32768, seq_len=2048)
    matmul = c.n_layers * (4 * c.d_model ** 2 + 3 * c.d_model * c.d_ff) + c.d_model * c.vocab_size
    assert flops_per_token(c, 1024) == 6 * matmul + 12 * c.n_layers * c.d_model * 1024


def test_flops_per_token_counts_every_loop_mtp_depth_and_hyper_map():
    c = model_config("tiny", vocab_size=384, seq_len=128)
    base = flops_per_token(c, 128)
    head = 6 * c.d_model * c.vocab_size
    looped = flops_per_token(dataclasses.replace(c, loops=3), 128)
    assert looped == 3 * (base - head) + 3 * head  # blocks and the scored head, three times
    per_block = (base - head) / c.n_layers
    parallel = flops_per_token(dataclasses.replace(c, mtp_depth=2, mtp_kind="parallel"), 128)
    assert parallel == base + 2 * (per_block + head)
    sequential = flops_per_token(dataclasses.replace(c, mtp_depth=1), 128)
    assert sequential == base + per_block + head + 6 * 2 * c.d_model ** 2
    assert flops_per_token(dataclasses.replace(c, mhc_streams=4), 128) > base
    assert flops_per_token(dataclasses.replace(c, mhc_streams=4, mhc_dynamic=False), 128) == base


def test_tree_bytes_counts_every_leaf():
    tree = {"a": jnp.zeros((3, 4), jnp.float32), "b": [jnp.zeros((5,), jnp.int8)]}
    assert tree_bytes(tree) == 3 * 4 * 4 + 5


def test_chip_datasheets_match_device_kinds_exactly_then_by_prefix():
    from nanochat_jax.train.metrics import GiB, chip

    assert chip("TPU v5 lite").hbm_bytes == 16 * GiB  # v5e, not v5p's "TPU v5"
    assert chip("TPU v5").hbm_bytes == 95 * GiB
    assert chip("NVIDIA H100 80GB HBM3").bf16_flops == 989e12
    assert chip("NVIDIA A100-SXM4-40GB").hbm_bytes == 40e9
    assert chip("cpu") is None


def test_the_mfu_peak_is_per_chip_from_the_setting_the_datasheet_or_a_measurement(
        monkeypatch):
    import types

    from nanochat_jax.train import metrics

    assert metrics.peak_flops_per_chip(5e12) == (5e12, "set")
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda: 1e11)
    assert metrics.peak_flops_per_chip() == (1e11, "measured")  # a CPU
    monkeypatch.setattr(metrics.jax, "devices",
                        lambda: [types.SimpleNamespace(device_kind="TPU v5 lite")])
    assert metrics.peak_flops_per_chip() == (197e12, "datasheet bf16")
    # 8 chips at 1e12 each, 100 tokens/s of 4e9 FLOPs: 4e11 / 8e12
    assert metrics.mfu(100.0, 4e9, 1e12, 8) == pytest.approx(0.05)


def test_the_trainer_loads_tensorboardX_only_when_its_first_metrics_writer_opens(tmp_path):
    """tensorboardX imports torch where torch is installed (the hf extra), a slow import: a
    process that imports the trainer and stops before training (a refused config) loads
    neither, and the first writer loads tensorboardX and writes its event file."""
    code = ("import sys\n"
            "from nanochat_jax.train import trainer\n"
            "from nanochat_jax.train.metrics import MetricWriter\n"
            "print('tensorboardX' in sys.modules, 'torch' in sys.modules)\n"
            f"w = MetricWriter({str(tmp_path)!r})\n"
            "w.write(1, {'loss': 2.5})\n"
            "w.close()\n"
            "print('tensorboardX' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "True"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'
    assert list((tmp_path / "tb").iterdir())  # the TensorBoard event file
