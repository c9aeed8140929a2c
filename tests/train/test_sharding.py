"""Sharding is data: every parameter and optimizer state gets the spec the rules say, and a
run on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices, or over two processes, trains
the same model as one device."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.quantized import quantize_states
from nanochat_jax.train import sharding
from nanochat_jax.train.checkpoint import load_run

MESH = AbstractMesh((2, 2, 2), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def _shapes(**fields):
    cfg = model_config("tiny", vocab_size=384, seq_len=128, **fields)
    return jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]


def test_matrices_split_embed_over_fsdp_and_heads_mlp_vocab_over_tensor():
    specs = sharding.param_specs(_shapes(), MESH)
    block = specs["block_0"]
    assert block["attn"]["q"]["kernel"] == P("fsdp", "tensor")
    assert block["attn"]["k"]["kernel"] == P("fsdp", "tensor")
    assert block["attn"]["o"]["kernel"] == P("tensor", "fsdp")
    assert block["ffn"]["w1"]["kernel"] == P("fsdp", "tensor")
    assert block["ffn"]["w2"]["kernel"] == P("tensor", "fsdp")
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    assert block["attn_norm"]["scale"] == P() and specs["final_norm"]["scale"] == P()


def test_every_parameter_of_every_feature_has_a_rule():
    shapes = _shapes(mtp_depth=1, loops=2, mhc_streams=2)
    specs = sharding.param_specs(shapes, MESH)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree.structure(shapes)
    assert specs["mtp_0"]["proj"]["kernel"] == P(None, "fsdp")
    assert specs["block_0"]["hyper_attn"]["phi"] == P("fsdp", None)
    assert specs["exit_gate"]["kernel"] == P("fsdp", None)


def test_a_parameter_without_a_rule_is_named_in_the_error():
    with pytest.raises(ConfigError, match="parameter block_0/new/w .* no row in PARAMS"):
        sharding.param_specs({"block_0": {"new": {"w": jnp.zeros((4, 4))}}}, MESH)


def test_dimensions_the_mesh_does_not_divide_stay_whole():
    mesh = AbstractMesh((1, 3, 1), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
    specs = sharding.param_specs(_shapes(), mesh)  # d_model 128 is not a multiple of 3
    assert specs["block_0"]["attn"]["q"]["kernel"] == P(None, "tensor")  # tensor: size 1
    assert specs["block_0"]["ffn"]["w2"]["kernel"] == P("tensor", None)


def test_optimizer_states_shard_like_their_parameters_including_8bit_codes():
    import optax

    params = _shapes()
    states = {"adam": optax.adamw(1e-3), "8bit": quantize_states(optax.adam(1e-3))}
    for name, tx in states.items():
        state = jax.eval_shape(tx.init, params)
        specs = sharding.state_specs(state, params, MESH)
        flat = {sharding.path_name(p): (s, leaf.shape) for (p, s), leaf in zip(
            jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0],
            jax.tree.leaves(state), strict=True)}
        if name == "adam":
            mu = [s for k, (s, _) in flat.items() if k.endswith("mu/block_0/attn/q/kernel")]
            assert mu == [P("fsdp", "tensor")]
        else:  # int8 codes [blocks, 256] of the FFN moments: blocks split over fsdp
            codes = [(s, shape) for k, (s, shape) in flat.items()
                     if "block_0/ffn/w1/kernel" in k and k.endswith("codes")]
            assert codes and all(s == P("fsdp", None) for s, _ in codes), codes
        small = [s for k, (s, shape) in flat.items() if np.prod(shape) < 4096]
        assert all(s == P() for s in small)


@pytest.mark.parametrize("sizes,devices,want", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((2, 2, 2), 8, (2, 2, 2)), ((1, -1, 2), 8, (1, 4, 2)),
])
def test_mesh_shape_fills_the_minus_one_axis(sizes, devices, want):
    mc = dict(zip(sharding.AXES, sizes, strict=True))
    assert tuple(sharding.mesh_shape(mc, devices).values()) == want


@pytest.mark.parametrize("sizes,message", [
    ((2, 2, 1), "has 4 devices but 8 are available"),
    ((-1, 3, 1), "8 devices are not a multiple of 3"),
    ((-1, -1, 1), "at most one -1"),
])
def test_a_mesh_that_does_not_match_the_devices_is_refused(sizes, message):
    with pytest.raises(ConfigError, match=message):
        sharding.mesh_shape(dict(zip(sharding.AXES, sizes, strict=True)), 8)


def _mesh_run(workdir, mesh, devices=1, distributed=(), env=None):
    """tests/train/mesh_run.py in a fresh process with `devices` CPU devices."""
    env = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, os.path.join(HERE, "mesh_run.py"), str(workdir), *map(str, mesh),
           *map(str, distributed)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _result(proc) -> dict:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return json.loads(next(line for line in out.splitlines()
                           if line.startswith("RESULT "))[len("RESULT "):])


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row["loss/total"] for row in map(json.loads, f) if "loss/total" in row]


def _assert_same_training(workdir, reference):
    """Same loss curve (float-summation order aside) and the same parameters. The order
    differs with the host's vector width too: on an AVX2-only EPYC the 2x2x2 mesh ends its
    4th step 1.06e-4 (relative) from one device, on AVX-512 hosts within 1e-4."""
    np.testing.assert_allclose(_losses(workdir), _losses(reference), rtol=2e-4)
    got, want = (jax.tree.leaves(load_run(str(w))[1].params) for w in (workdir, reference))
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(got, want, strict=True)])
    # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise moves a weight
    # by up to a few lr-sized steps; nearly all weights agree to 1e-4
    assert np.percentile(diff, 99) < 3e-4 and diff.max() < 1e-2, np.percentile(diff, [50, 99])


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, corpus_cache):
    workdir = tmp_path_factory.mktemp("one_device")
    _result(_mesh_run(workdir, (1, 1, 1)))
    return workdir


@pytest.mark.slow
def test_a_2x2x2_mesh_of_8_devices_trains_like_one_device(single_device_run, tmp_path):
    result = _result(_mesh_run(tmp_path, (2, 2, 2), devices=8))
    assert result["devices"] == 8
    assert result["q_spec"] == ["fsdp", "tensor"] and result["q_shard"] == [64, 64]
    assert result["mu_spec"] == ["fsdp", "tensor"]  # the Adam moment shards like q
    assert result["embed_spec"] == ["tensor", "fsdp"] and result["norm_spec"] == []
    _assert_same_training(tmp_path, single_device_run)
    # MFU: global tokens/s against the peak of all 8 devices (training.peak_flops is per chip)
    summary = result["summary"]
    assert summary["throughput/mfu"] == pytest.approx(
        summary["throughput/tokens_per_sec"] * result["flops_per_token"]
        / (8 * result["peak_flops"]), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_over_jax_distributed_train_and_checkpoint(single_device_run, tmp_path):
    port = _free_port()
    procs = [_mesh_run(tmp_path, (2, 1, 1), distributed=(i, 2, port)) for i in range(2)]
    results = [_result(p) for p in procs]
    assert [r["processes"] for r in results] == [2, 2]
    assert results[0]["summary"]["loss/total"] == results[1]["summary"]["loss/total"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    _assert_same_training(tmp_path, single_device_run)  # process 0 wrote the metrics
