"""The ternary kernel per shard on an 8-device simulated CPU mesh, in a fresh process (the
device count is fixed when JAX starts): `python tests/ternary/shard_run.py`. Prints one line
`RESULT {json}`: per case, the largest difference from the unsharded reference (forward and
STE gradients) and the number of shard_map calls in the traced program."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from nanochat_jax.model.axes import AXES, kernel_layout  # noqa: E402
from nanochat_jax.model.config import model_config  # noqa: E402
from nanochat_jax.model.transformer import Transformer  # noqa: E402
from nanochat_jax.ternary import packing  # noqa: E402
from nanochat_jax.ternary.linear import packed_dot, ternary_dot  # noqa: E402

MESHES = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "data=2 fsdp=2 tensor=2": (2, 2, 2)}
# (kernel path, K, N): an input projection (K = embed, N = heads) and an output projection
# (K = mlp, split over tensor: per-shard partial sums)
KERNELS = {"q": ("block_0/attn/q/kernel", 128, 256), "w2": ("block_0/ffn/w2/kernel", 256, 128)}


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _shard_maps(f, *args) -> int:
    return str(jax.make_jaxpr(f)(*args)).count("shard_map")


def kernel_case(mesh, name: str) -> dict:
    path, k, n = KERNELS[name]
    layout = kernel_layout(path)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 16, k)), jnp.float32)  # [B, T, K]
    w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(8, 16, n)), jnp.float32)

    def loss(impl, lay):
        return lambda x, w: jnp.sum(ternary_dot(x, w, impl, lay) * cot)

    y_ref = ternary_dot(x, w, "reference")
    g_ref = jax.grad(loss("reference", None), (0, 1))(x, w)
    x_spec = P(("data", "fsdp"), None, "tensor" if layout.k else None)
    w_spec = P("fsdp" if path.endswith("q/kernel") else "tensor",
               "tensor" if path.endswith("q/kernel") else "fsdp")  # as train/sharding.py
    xs = jax.device_put(x, NamedSharding(mesh, x_spec))
    ws = jax.device_put(w, NamedSharding(mesh, w_spec))
    with jax.set_mesh(mesh):
        forward = jax.jit(lambda x, w: ternary_dot(x, w, "interpret", layout))
        grads = jax.jit(jax.grad(loss("interpret", layout), (0, 1)))
        y = forward(xs, ws)
        g = grads(xs, ws)
        calls = _shard_maps(forward, xs, ws)
        packed = packing.pack(w)
        decode = jax.jit(lambda x, p: packed_dot(x, p, "interpret", layout))
        y_packed = decode(xs, packed)
        packed_psums = str(jax.make_jaxpr(decode)(xs, packed)).count("psum")
    return {"forward": _max_diff(y, y_ref), "dx": _max_diff(g[0], g_ref[0]),
            "dw": _max_diff(g[1], g_ref[1]), "packed": _max_diff(y_packed, y_ref),
            "packed_psums": packed_psums,
            "scale": float(np.max(np.abs(np.asarray(y_ref)))), "shard_maps": calls}


def model_case(mesh) -> dict:
    """The whole model (1 layer of the tiny preset): interpret kernels per shard vs the
    reference with no mesh."""
    cfg = model_config("tiny", vocab_size=384, seq_len=128, n_layers=1, kernel_backend="interpret")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 384, size=(8, 16)), jnp.int32)
    ref_model = Transformer(model_config("tiny", vocab_size=384, seq_len=128, n_layers=1,
                                             kernel_backend="reference"))
    params = ref_model.init(jax.random.key(0), tokens)
    want = ref_model.apply(params, tokens)
    placed = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
    forward = jax.jit(Transformer(cfg).apply)
    with jax.set_mesh(mesh):
        got = forward(params, placed)
        calls = _shard_maps(forward, params, placed)
    return {"forward": _max_diff(got, want), "scale": float(np.max(np.abs(np.asarray(want)))),
            "shard_maps": calls}


def main() -> None:
    out = {}
    for mesh_name, shape in MESHES.items():
        mesh = jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
        for name in KERNELS:
            out[f"{mesh_name}|{name}"] = kernel_case(mesh, name)
        out[f"{mesh_name}|model"] = model_case(mesh)
        print(mesh_name, "done", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
