"""The GPU path compiled to machine code on a CPU host: the Pallas kernel through Triton to
cubin for an H100 (and the A100, H200 and B200 target configs), every tiling the tuner may
try, the shared-memory rule that keeps the others from it, and the whole train and decode
steps of a small preset on 1 and 8 H100s (experiments/compile.py).

Needs jax's CUDA plugin and compiler (`pip install -e '.[cuda]'`) and, on a host without a
GPU driver, `JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` in the environment before
JAX starts (CI runs this file that way, in its own virtualenv: .ci/run)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import compile as compile_lib
from experiments import targets
from experiments.configs import tiny
from nanochat_jax.ternary import kernel, packing, tiling, tuning

REQUIRED = os.environ.get("NANOCHAT_REQUIRE_GPU_COMPILE") == "1"  # CI: fail, never skip


def _h100_or_reason():
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        return None, ("compiling for NVIDIA GPUs needs jax's CUDA plugin and compiler: "
                      "pip install -e '.[cuda]' (CI installs it in its own virtualenv)")
    try:
        return compile_lib.topology("h100"), None
    except Exception as e:  # the plugin checked for a driver: the variables are not set
        return None, (f"the CUDA plugin did not start ({str(e).splitlines()[0][:120]}): set "
                      f"JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before JAX starts")


H100, WHY_NOT = _h100_or_reason()
if H100 is None and REQUIRED:
    raise RuntimeError(f"NANOCHAT_REQUIRE_GPU_COMPILE=1 but {WHY_NOT}")
pytestmark = [
    pytest.mark.skipif(H100 is None, reason=WHY_NOT or ""),
    # compile-only devices have no client to load a persistent-cache entry with (the suite's
    # cache, tests/conftest.py): JAX warns and compiles again, which is all these tests do
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry"),
]

TRITON_CALL = 'custom_call_target="__gpu$xla.gpu.triton"'
# (M, K, N): decode rows and training rows of 125m-, 1b- and 7b-shaped layers, K4 a multiple
# of 128 or not (768 -> K4 192)
SHAPES = [(1, 768, 768), (16, 4096, 4096), (8, 2048, 8192), (4096, 768, 2048),
          (2048, 2048, 768), (1, 4096, 11008), (1024, 11008, 4096)]
DTYPES = [jnp.int8, jnp.bfloat16]
# where the tuner's candidates are checked one by one: the largest training product (where
# bf16 (128, 128, *) asked for more shared memory than an H100 has), 125m's training shape,
# and decode products (narrow N tiles and K splits)
TUNED_SHAPES = [(4096, 4096, 11008), (4096, 768, 2048), (16, 4096, 4096), (1, 768, 2048)]
KERNELS = 4 * 7  # every BitLinear of the tiny preset's 4 layers: q, k, v, o, w1, w3, w2


def _chip(described):
    return jax.sharding.Mesh(np.asarray(described.devices[:1]), ("data",))


def _compile(mesh, fn, *shapes):
    replicated = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


def _packed(k: int, n: int) -> tuple[int, int]:
    return jax.eval_shape(packing.pack_codes, jax.ShapeDtypeStruct((k, n), jnp.int8)).shape


def _tiling_compiles(mesh, m, k, n, dtype, blocks) -> None:
    k4, n_p = _packed(k, n)
    _compile(mesh, lambda x, c: kernel.pallas_matmul(x, c, blocks, "triton"),
             ((m, 4 * k4), dtype), ((k4, n_p), jnp.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_compiles_for_h100_with_triton(shape, dtype):
    """`impl="auto"` on an H100 mesh is one Triton kernel call, compiled to cubin."""
    m, k, n = shape
    compiled = _compile(_chip(H100), lambda x, c: kernel.codes_matmul(x, c),
                        ((m, k), dtype), ((k, n), jnp.int8))
    assert compiled.as_text().count(TRITON_CALL) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "bf16"])
@pytest.mark.parametrize("shape", TUNED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_tiling_the_tuner_may_try_on_an_h100_compiles(shape, dtype):
    """The candidates for an H100 (those within its shared memory), and the Triton
    compiler parameters the tuner then tries on the largest of them, all compile; the
    tilings that did not compile are not among them."""
    m, k, n = shape
    gpu = tiling.gpu_of(H100.devices[0])
    assert gpu == ((9, 0), 232448)
    k4, n_p = _packed(k, n)
    candidates = kernel.TRITON.candidates(m, k4, n_p, dtype, gpu)
    assert candidates
    if shape == (4096, 4096, 11008) and dtype == jnp.bfloat16:  # these asked for too much
        assert not {(128, 128, 64), (128, 128, 128), (128, 128, 256)} & {
            tuple(b[:3]) for b in candidates}
    largest = max(candidates, key=lambda b: tiling.triton_shared_memory(b, dtype))
    variants = [largest._replace(num_warps=w, num_stages=s) for w, s in tuning.TRITON_PARAMS]
    mesh = _chip(H100)
    for blocks in candidates + [v for v in variants if kernel.TRITON.fits(v, dtype, gpu)]:
        _tiling_compiles(mesh, m, k, n, dtype, blocks)


def _limited(name: str, shared_memory: int):
    """A target config of experiments/targets/ with its shared memory per block set low."""
    text = re.sub(r"shared_memory_per_block_optin: \d+",
                  f"shared_memory_per_block_optin: {shared_memory}", targets.config_text(name))
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")


@pytest.mark.parametrize("gpu", ["h100", "a100"])
def test_the_shared_memory_rule_bounds_what_triton_asks_for(gpu):
    """With 1 KiB of shared memory every compile fails naming the bytes it needed: the rule
    (tiling.triton_shared_memory) is at or above each, for the tilings the tuner can offer
    at a training and a decode shape, both dtypes: with every Triton (num_warps,
    num_stages) the tuner tries where the rule asks 64 KiB or more (near the limits it
    guards: 99-227 KiB), with the default parameters everywhere."""
    mesh = _chip(_limited(gpu, 1024))
    capability = tiling.gpu_of(mesh.devices.flat[0]).capability
    seen = set()
    for m, k, n in [(4096, 4096, 11008), (16, 4096, 4096)]:
        k4, n_p = _packed(k, n)
        for dtype in DTYPES:
            for blocks in kernel.TRITON.candidates(m, k4, n_p, dtype):
                for warps, stages in tuning.TRITON_PARAMS:
                    variant = blocks._replace(num_warps=warps, num_stages=stages)
                    bound = tiling.triton_shared_memory(variant, dtype, capability)
                    key = (tuple(variant[:3]) + variant[4:], jnp.dtype(dtype).name)
                    if key in seen or ((warps, stages) != (4, 2) and bound < 65536):
                        continue
                    seen.add(key)
                    with pytest.raises(jax.errors.JaxRuntimeError) as refused:
                        _tiling_compiles(mesh, m, k, n, dtype, variant)
                    asked = int(re.search(r"requested (\d+)", str(refused.value)).group(1))
                    assert asked <= bound, (gpu, variant, jnp.dtype(dtype).name, asked)
    assert len(seen) > 150


@pytest.mark.parametrize("gpu", ["a100", "h200", "b200"])
def test_the_other_gpu_target_configs_compile_the_kernel(gpu):
    """experiments/targets/ describes each GPU well enough for XLA and Triton to compile for
    it: a decode and a training product, their default tilings."""
    described = compile_lib.topology(gpu)
    assert described.devices[0].device_kind.startswith("NVIDIA")
    for m, k, n in [(1, 4096, 4096), (4096, 768, 2048)]:
        compiled = _compile(_chip(described), lambda x, c: kernel.codes_matmul(x, c),
                            ((m, k), jnp.int8), ((k, n), jnp.int8))
        assert compiled.as_text().count(TRITON_CALL) == 1


def test_usable_gpu_memory_is_the_allocators_share_of_the_device(monkeypatch):
    device = H100.devices[0]
    assert compile_lib.usable_memory(device, "h100") == 0.75 * 84942979072
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert compile_lib.usable_memory(device, "h100x8") == 0.9 * 84942979072


def _tiny(**mesh):
    c = tiny.get_config()
    c.data.batch_size = 16
    c.mesh.update(mesh)
    return c


@pytest.mark.slow
@pytest.mark.parametrize("topology,mesh", [("h100", {}), ("h100x8", {"data": 1, "fsdp": 8}),
                                           ("h100x8", {"data": 1, "fsdp": 4, "tensor": 2})],
                         ids=["1", "fsdp8", "fsdp4-tensor2"])
def test_train_and_decode_steps_compile_for_h100s_with_the_kernel(topology, mesh):
    """The tiny preset's real train step (`kernel_backend=auto`, bf16 by default on a GPU) and
    the engine's packed decode step: one Triton call per BitLinear forward on every mesh."""
    info, (train, decode) = compile_lib.compile_steps(_tiny(**mesh), topology, 8)
    assert info["ternary_impl"] == "auto -> pallas" and info["compute_dtype"] == "bfloat16"
    assert info["device_kind"] == "NVIDIA H100 80GB HBM3" and info["chips"] == (
        8 if topology.endswith("x8") else 1)
    for row in (train, decode):
        assert row["kernel_calls"] == KERNELS and row["fits"]
        assert 0 < row["argument_bytes"] < row["total_bytes"] < row["hbm_bytes"]
        assert row["flops_from"] == "model" and row["flops"] > 0
    c = _tiny(**mesh)
    c.model.ternary_product = "fake_quant"
    _, (fake,) = compile_lib.compile_steps(c, topology, 0)
    assert fake["kernel_calls"] == 0


@pytest.mark.slow
def test_compile_command_reports_memory_and_the_triton_kernel_for_h100(tmp_path):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.compile", "--topology=h100", "--config=tiny",
         "--config.data.batch_size=8", f"--out={out}"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 x NVIDIA H100 80GB HBM3" in done.stdout and "Triton kernel calls" in done.stdout
    train, decode = (json.loads(line) for line in out.read_text().splitlines())
    assert train["kernel_calls"] == decode["kernel_calls"] == KERNELS
    assert train["compute_dtype"] == "bfloat16" and train["platform"] == "gpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "bf16"])
@pytest.mark.parametrize("shape", [(8, 768, 768), (4096, 2048, 768), (1, 4096, 11008)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kernel_lowers_to_triton_for_cuda_with_no_mesh(shape, dtype):
    """`impl="auto"` exported for CUDA with no mesh in context (platform_dependent picks
    the branch): the Triton kernel, not the reference."""
    m, k, n = shape
    exported = export.export(
        jax.jit(lambda x, c: kernel.codes_matmul(x, c)), platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), jnp.int8))
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert text.count("custom_call @__gpu$xla.gpu.triton(") == 1
    assert 'name = "_kernel"' in text  # the Pallas kernel's Triton module
