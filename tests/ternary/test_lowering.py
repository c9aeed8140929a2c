"""The Pallas kernel compiles for TPUs, proven on a CPU host: by libtpu's compiler on
compile-only devices (`jax.experimental.topologies`). A kernel change that Mosaic rejects
fails here; tests/test_compile_gpu.py does the same for GPUs through Triton."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax.ternary import kernel, packing
from nanochat_jax.ternary.linear import packed_dot, ternary_dot
from nanochat_jax.train.sharding import tpu_topology

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for TPU needs libtpu: pip install -e '.[tpu]' (CI installs it)")

# (M, K, N): decode rows and training rows for 125m-, 1b- and 7b-shaped layers, K4 aligned
# to 128 or not (768 -> K4 192: one whole-K step)
SHAPES = [(1, 768, 768), (8, 2048, 8192), (4096, 768, 2048), (2048, 2048, 768),
          (1, 4096, 11008), (1024, 11008, 4096)]
DTYPES = [jnp.int8, jnp.bfloat16]


@pytest.fixture(scope="module")
def tpu_chip():
    """A one-chip mesh of a compile-only TPU v5e."""
    devices = tpu_topology("v5e:2x2").devices
    return jax.sharding.Mesh(np.asarray(devices[:1]), ("data",))


def _compile_for(mesh, fn, *shapes):
    replicated = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


@needs_libtpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_compiles_for_tpu_with_mosaic(tpu_chip, shape, dtype):
    m, k, n = shape
    compiled = _compile_for(tpu_chip, lambda x, c: kernel.codes_matmul(x, c),
                            ((m, k), dtype), ((k, n), jnp.int8))
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 1
    # the kernel's own cost estimate reaches XLA's cost analysis (padded rows included)
    assert compiled.cost_analysis()["flops"] >= 2 * m * k * n


@needs_libtpu
@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5p:2x2x1", "v6e:2x2"])
def test_kernel_compiles_for_every_tpu_generation(topology):
    """v4 has no int8 matrix unit (Mosaic refuses an int8 matmul there): its kernel takes
    the int8 activations as bf16 operands; v5p and v6e multiply int8 directly."""
    devices = tpu_topology(topology).devices
    chip = jax.sharding.Mesh(np.asarray(devices[:1]), ("data",))
    compiled = _compile_for(chip, lambda x, c: kernel.codes_matmul(x, c),
                            ((256, 3072), jnp.int8), ((3072, 8192), jnp.int8))
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 1


@needs_libtpu
def test_training_and_decode_products_compile_for_tpu(tpu_chip):
    """ternary_dot with its gradient (the training path) and the packed weights of
    inference, int8 activations made inside, in bf16."""
    step = jax.value_and_grad(lambda x, w: jnp.sum(ternary_dot(x, w) ** 2), (0, 1))
    compiled = _compile_for(tpu_chip, step, ((4, 256, 768), jnp.bfloat16),
                            ((768, 2048), jnp.float32))
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()
    packed = jax.eval_shape(packing.pack, jax.ShapeDtypeStruct((2048, 768), jnp.float32))
    replicated = NamedSharding(tpu_chip, P())
    packed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          packed)
    x = jax.ShapeDtypeStruct((8, 1, 2048), jnp.bfloat16, sharding=replicated)
    with jax.set_mesh(tpu_chip):
        compiled = jax.jit(packed_dot).lower(x, packed).compile()
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()
