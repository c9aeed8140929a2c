"""The Pallas kernel per shard (shard_map, interpret mode) on an 8-device simulated CPU mesh
equals the unsharded reference, forward and STE gradients, for data, fsdp and tensor splits
(tests/ternary/shard_run.py runs in its own process: the device count is fixed at start)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = ("data=8", "fsdp=8", "data=2 fsdp=2 tensor=2")  # every split, alone and together
# The subprocess pins itself to 8 simulated CPU devices: on a GPU host it would test the CPU
# again (experiments/gpu_check.sh's selection skips it there).
pytestmark = pytest.mark.cpu_only("the kernel per shard on 8 simulated CPU devices")


@pytest.fixture(scope="module")
def results():
    done = subprocess.run([sys.executable, os.path.join(HERE, "shard_run.py")],
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(HERE)))
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kernel", ["q", "w2"])
def test_kernel_per_shard_equals_the_unsharded_reference(results, mesh, kernel):
    """q: K = embed (gathered over fsdp), N = heads (split over tensor); w2: K = mlp split
    over tensor, so every shard holds partial sums that the explicit psum adds."""
    r = results[f"{mesh}|{kernel}"]
    assert r["shard_maps"] == 1
    assert r["forward"] <= 1e-6 * r["scale"]
    assert r["packed"] <= 1e-6 * r["scale"]  # the packed inference weights


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kernel", ["q", "w2"])
def test_packed_weights_split_k_under_tensor_parallelism_as_training_does(results, mesh,
                                                                            kernel):
    """w2's K is the mlp axis: with tensor=2 each shard multiplies its K4/2 packed rows by
    the matching columns of x's four slabs and a psum adds them (before, packed codes kept
    K whole and every device held all of o and w2)."""
    r = results[f"{mesh}|{kernel}"]
    assert (r["packed_psums"] > 0) == (kernel == "w2" and "tensor" in mesh)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kernel", ["q", "w2"])
def test_gradients_through_the_sharded_kernel_are_the_unsharded_ste_gradients(results, mesh,
                                                                              kernel):
    r = results[f"{mesh}|{kernel}"]
    assert r["dx"] <= 1e-5 and r["dw"] <= 1e-4  # |dW| entries are sums of 128 products


@pytest.mark.parametrize("mesh", MESHES)
def test_model_on_a_mesh_runs_every_bitlinear_per_shard_and_matches(results, mesh):
    r = results[f"{mesh}|model"]
    assert r["shard_maps"] == 7  # q, k, v, o, w1, w3, w2 of the one layer
    assert r["forward"] <= 1e-5 * r["scale"]
