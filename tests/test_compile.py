"""experiments/compile.py: the real train step and decode step compiled for a TPU topology on
a CPU host, with the Pallas kernel per shard (fsdp and tensor splits)."""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.train.sharding import tpu_topology

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for TPU needs libtpu: pip install -e '.[tpu]' (CI installs it)")

# every BitLinear of the tiny preset's 4 layers: q, k, v, o, w1, w3, w2
KERNELS = 4 * 7


def _tiny(**mesh):
    c = tiny.get_config()
    c.data.batch_size = 8
    c.mesh.update(mesh)
    return c


@pytest.mark.slow
def test_compile_command_reports_memory_flops_and_the_mosaic_kernel(tmp_path):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.compile", "--topology=v5e:2x2", "--config=tiny",
         "--config.data.batch_size=8", "--mesh=data=1,fsdp=4,tensor=1", f"--out={out}"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 x TPU v5 lite, mesh data=1, fsdp=4, tensor=1" in done.stdout
    assert "| train (batch 8 x 128) |" in done.stdout and "| decode (batch 8" in done.stdout
    train, decode = (json.loads(line) for line in out.read_text().splitlines())
    for row in (train, decode):
        assert row["kernel_calls"] == KERNELS  # the forward of every BitLinear: Mosaic
        assert 0 < row["argument_bytes"] < row["total_bytes"] < row["hbm_bytes"] and row["fits"]
        assert row["ternary_impl"] == "auto -> pallas" and row["mesh"]["fsdp"] == 4
        # "fits" against what XLA's TPU compiler says a v5e has (15.75 GiB), not the
        # datasheet's 16; bf16 compute, the default where the step is compiled for a TPU
        assert row["hbm_bytes"] == 15.75 * 2**30 and row["compute_dtype"] == "bfloat16"
        assert row["flops_from"] == "compiler"
    # per-device FLOPs: the compiled step against the model's own count (6N per token + attn)
    assert 0.5 < train["flops"] / train["model_flops"] < 3
    assert "--mesh=data=1,fsdp=4,tensor=1" in train["command"]


@pytest.mark.slow
def test_train_step_compiles_with_tensor_parallel_kernels_and_fake_quant_has_none():
    from experiments.compile import compile_steps

    info, (train, decode) = compile_steps(_tiny(data=2, fsdp=1, tensor=2), "v5e:2x2", 8)
    assert info["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert train["kernel_calls"] == decode["kernel_calls"] == KERNELS and train["fits"]
    c = _tiny(data=1, fsdp=4, tensor=1)
    c.model.ternary_product = "fake_quant"
    _, (train,) = compile_steps(c, "v5e:2x2", 0)
    assert train["kernel_calls"] == 0 and train["flops"] > 0


def test_impossible_meshes_are_refused_before_compiling():
    from experiments.compile import compile_steps
    from nanochat_jax.errors import ConfigError

    odd_batch = _tiny(data=1, fsdp=4, tensor=1)
    odd_batch.data.batch_size = 6
    with pytest.raises(ConfigError, match="must be a multiple of mesh.data x mesh.fsdp"):
        compile_steps(odd_batch, "v5e:2x2", 0)
    with pytest.raises(ConfigError, match="devices"):
        compile_steps(_tiny(data=1, fsdp=8, tensor=1), "v5e:2x2", 0)


@pytest.mark.slow
def test_a_step_that_does_not_fit_is_reported_not_raised():
    """XLA's TPU compiler refuses a program whose temporaries exceed HBM: the row says so
    and what it asked for (here 131,072 rows of the tiny model on four 16 GiB chips)."""
    from experiments.compile import compile_steps

    c = _tiny(data=1, fsdp=4, tensor=1)
    c.data.batch_size = 131072
    _, (train,) = compile_steps(c, "v5e:2x2", 0)
    assert train["fits"] is False and train["total_bytes"] is None
    assert train["temp_bytes"] > train["hbm_bytes"] and "RESOURCE_EXHAUSTED" in train["error"]


def test_the_model_traces_bf16_activations_by_default_under_a_tpu_mesh():
    """`compute_dtype=auto` resolves for the mesh the model is compiled for: bf16 dots on a
    (compile-only) TPU chip, while the same config on this CPU stays float32
    (tests/model/test_model.py)."""
    chip = tpu_topology("v5e:2x2").devices[:1]
    model = Transformer(model_config("tiny", vocab_size=64, seq_len=16, n_layers=1))
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    with jax.set_mesh(jax.sharding.Mesh(np.asarray(chip), ("data",))):
        traced = str(jax.make_jaxpr(model.apply)(params, tokens))
    assert "bf16[1,8,128]" in traced
