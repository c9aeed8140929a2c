"""Mesh, logical axis rules and multi-host start-up: how one runner spans devices and hosts.

Sharding is data, not code (docs/design.md#sharding-by-logical-axes). Every parameter gets
logical axis names from its row of `PARAMS` (model/params.py, a table on its Flax path:
`embed/embedding` -> ("vocab", "embed"), `.../attn/q/kernel` -> ("embed", "heads"), ...),
and `LOGICAL_RULES` (model/axes.py) map logical names to the mesh axes `data`, `fsdp`,
`tensor` (the model reads both too): FSDP splits `embed` over `fsdp`, tensor parallelism
`heads`, `mlp` and `vocab` over `tensor`, and the batch is split over `data` x `fsdp`.

A dimension that the mesh axis does not divide stays whole. Optimizer-state leaves that are
not shaped like their parameter (8-bit blockwise codes, GaLore projections and bases) are
split over `fsdp` along their first divisible dimension (the blocks of 8-bit codes). The
step is `jax.jit` with these shardings in and out; XLA's SPMD partitioner inserts the
collectives.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import jax
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax.errors import ConfigError
from nanochat_jax.model.axes import AXES, LOGICAL_RULES
from nanochat_jax.model.params import param_axes, path_name

MIN_SHARDED_STATE = 2**12  # optimizer-state leaves smaller than this stay replicated
MEGACORE = ("v4", "v5p")  # TPU generations whose two TensorCores form one device


def prepare_libtpu_without_tpu() -> None:
    """What libtpu reads when it starts, set for a host without a TPU, where it starts only
    to compile for one (`tpu_topology`) or because JAX starts every installed backend (the
    test session). Unset, libtpu prints a screen of warnings, and a second process that loads
    it fails on its lockfile (`pytest -n 2`, parallel compiles), a lock that guards nothing
    where there is no device. Call it before the TPU backend starts; values already in the
    environment stay; on a TPU host it does nothing. Importing the package sets nothing."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_topology(name: str):
    """The compile-only devices (`.devices`) of a TPU topology GENERATION:SHAPE ("v5e:2x2"),
    for compiling for it on any host (libtpu: the `tpu` extra)."""
    prepare_libtpu_without_tpu()
    generation = name.split(":")[0]
    return topologies.get_topology_desc(
        platform="tpu", topology_name=name,
        chip_config_name="megacore" if generation in MEGACORE else "default")


def initialize_distributed(distributed) -> None:
    """`jax.distributed.initialize` from the config's `distributed` group, before any device
    is touched. `coordinator_address` set: explicit (with `num_processes`, `process_id`);
    `auto=True`: JAX's cluster detection (TPU pods, SLURM, Open MPI, or the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment); else a
    single process. CPU processes exchange data over gloo."""
    explicit = distributed.coordinator_address is not None
    if not (explicit or distributed.auto) or jax.distributed.is_initialized():
        return
    if explicit and (distributed.num_processes is None or distributed.process_id is None):
        raise ConfigError("distributed.coordinator_address needs distributed.num_processes "
                          "and distributed.process_id")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(distributed.coordinator_address, distributed.num_processes,
                                   distributed.process_id)
    else:
        jax.distributed.initialize(
            num_processes=int(os.environ["JAX_NUM_PROCESSES"])
            if "JAX_NUM_PROCESSES" in os.environ else None,
            process_id=int(os.environ["JAX_PROCESS_ID"])
            if "JAX_PROCESS_ID" in os.environ else None)


def mesh_shape(mesh_config, n_devices: int) -> dict[str, int]:
    """{axis: size} of the config's `mesh` group over `n_devices`; one axis may be -1 (the
    rest)."""
    sizes = {axis: int(mesh_config[axis]) for axis in AXES}
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive with at most one -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % known:
            raise ConfigError(f"mesh {sizes}: {n_devices} devices are not a multiple of "
                              f"{known}")
        sizes[rest[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices but "
                          f"{n_devices} are available (set one axis to -1 for the rest)")
    return sizes


def make_mesh(mesh_config) -> Mesh:
    """The (data, fsdp, tensor) mesh over every device of every process."""
    sizes = mesh_shape(mesh_config, jax.device_count())
    # Auto axes: XLA's SPMD partitioner propagates shardings through the model's ops
    return jax.make_mesh(tuple(sizes.values()), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _spec(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> P:
    """PartitionSpec of a leaf with these logical axes; undivisible dimensions stay whole."""
    import flax.linen as nn

    if not axes:
        return P()
    spec = list(nn.logical_to_mesh_axes(axes, LOGICAL_RULES))
    for i, mesh_axes in enumerate(spec):
        names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
        if shape[i] % math.prod(mesh.shape[a] for a in names):
            spec[i] = None
    return P(*spec)


def param_specs(params: Any, mesh: Mesh) -> Any:
    """PartitionSpecs of a params tree (arrays or shapes); every parameter must match a
    row of model/params.py `PARAMS` that names each of its dimensions (or none)."""
    def spec(path, leaf):
        name = path_name(path)
        axes = param_axes(name, leaf.shape)
        if len(axes) not in (0, leaf.ndim):
            raise ConfigError(f"parameter {name} {leaf.shape} has {leaf.ndim} dimensions but "
                              f"its row of PARAMS (model/params.py) names {len(axes)}")
        return _spec(leaf.shape, axes, mesh)

    return jax.tree_util.tree_map_with_path(spec, params)


def state_specs(tree: Any, params: Any, mesh: Mesh) -> Any:
    """PartitionSpecs of optimizer-state leaves: those named and shaped like a parameter
    shard like it; other large ones split their first fsdp-divisible dimension."""
    shapes = {path_name(p): leaf.shape for p, leaf in
              jax.tree_util.tree_flatten_with_path(params)[0]}
    fsdp = mesh.shape["fsdp"]

    def spec(path, leaf):
        shape = getattr(leaf, "shape", ())
        name = path_name(path)
        owner = next((p for p in shapes if name == p or name.endswith("/" + p)), None)
        if owner is not None and shapes[owner] == shape:
            return _spec(shape, param_axes(owner, shape), mesh)
        if math.prod(shape) < MIN_SHARDED_STATE or fsdp == 1:
            return P()
        for dim in range(len(shape)):  # 8-bit codes [blocks, block]: split the blocks
            if shape[dim] % fsdp == 0:
                return P(*[("fsdp" if i == dim else None) for i in range(len(shape))])
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def named(specs: Any, mesh: Mesh) -> Any:
    """A tree of PartitionSpecs as NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def train_state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings of a TrainState (its shapes from `jax.eval_shape`): params and
    optimizer state by the rules above, the scalars (step, RNG key, counters) replicated."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state).replace(
        params=named(param_specs(abstract_state.params, mesh), mesh),
        opt_state=named(state_specs(abstract_state.opt_state, abstract_state.params, mesh),
                        mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, T+1]: rows split over data x fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
