"""`experiments.compile --topology=cpu`: the train step compiled for this host, with its memory
analysis (no libtpu needed), and the loss's vocabulary chunk as a memory lever; the GPU
topology names and the decode roofline (no CUDA plugin needed)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from experiments.configs import tiny


def _compiled_train_row(vocab_chunk: int) -> dict:
    from experiments.compile import compile_steps

    c = tiny.get_config()
    c.data.batch_size = 8
    c.training.vocab_chunk = vocab_chunk
    info, (train,) = compile_steps(c, "cpu", 0)
    assert info["topology"] == "cpu" and info["ternary_impl"] == "auto -> reference"
    return train


@pytest.mark.slow
def test_the_cpu_compile_reports_memory_and_a_smaller_vocab_chunk_needs_less():
    whole, chunked = _compiled_train_row(384), _compiled_train_row(128)  # tiny's vocab: 384
    for row in (whole, chunked):
        assert row["argument_bytes"] > 0 and row["flops"] > 0 and "fits" not in row
    # the logits slab [B T, chunk] and its backward shrink with the chunk
    assert chunked["temp_bytes"] < whole["temp_bytes"]


@pytest.mark.slow
def test_a_scanned_model_compiles_its_train_step_and_the_unrolled_decode_step():
    """The decode row of a `model.scan_layers` run is compiled from the unrolled twin
    (`params.unscan`), as inference runs it."""
    from experiments.compile import compile_steps

    c = tiny.get_config()
    c.data.batch_size = 8
    c.model.scan_layers = True
    info, (train, decode) = compile_steps(c, "cpu", 1)
    assert info["scan_layers"] and train["step"].startswith("train")
    assert decode["step"].startswith("decode") and decode["total_bytes"] > 0


def test_gpu_topologies_name_a_target_config_and_a_count():
    from experiments import compile as compile_lib
    from experiments import targets
    from nanochat_jax.errors import ConfigError

    assert {"h100", "a100", "h200", "b200"} <= set(targets.names())
    assert compile_lib.gpu_target("h100") == ("h100", 1)
    assert compile_lib.gpu_target("b200x8") == ("b200", 8)
    assert compile_lib.gpu_target("v5e:2x2") is None and compile_lib.gpu_target("h999") is None
    assert compile_lib.gpu_target("h100x0") is None
    assert targets.field("h100", "memory_bandwidth") == 3352320000000
    with pytest.raises(ConfigError, match="nor a GPU of experiments/targets/ .*h100"):
        compile_lib.topology("h999")


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is not None,
                    reason="jax's CUDA plugin is installed here: tests/test_compile_gpu.py "
                           "compiles for GPUs instead")
def test_compiling_for_a_gpu_without_the_cuda_plugin_says_what_to_install():
    done = subprocess.run([sys.executable, "-m", "experiments.compile", "--topology=h100",
                           "--config=tiny"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "pip install -e '.[cuda]'" in done.stderr


def test_the_decode_roofline_counts_packed_weights_head_and_cache(tmp_path):
    """125m, batch 1, 1,024 cache slots: its zoo packed bytes, the fp32 head (32768 x 768)
    and the fp32 KV cache (2 x 12 layers x 12 heads x 1024 x 64), over each bandwidth."""
    from experiments import roofline, targets, zoo

    row = roofline.token_bytes("125m", 1024)
    assert row["packed"] == zoo.sizes(zoo.trained_model("125m"))["ternary_packed_bytes"]
    assert row["head"] == 32768 * 768 * 4 and row["kv_cache"] == 2 * 12 * 12 * 1024 * 64 * 4
    assert row["total"] == row["packed"] + row["head"] + row["kv_cache"]
    out = tmp_path / "roof.json"
    roofline.main(["--gpus=h100", "--context=1024", f"--out={out}"])
    saved = json.loads(out.read_text())
    (r125m,) = [r for r in saved["rows"] if r["preset"] == "125m"]
    bandwidth = targets.field("h100", "memory_bandwidth")
    assert abs(r125m["ms_per_token"]["h100"] - 1e3 * row["total"] / bandwidth) < 1e-9
