"""NVIDIA GPUs described for XLA without the hardware: one GpuTargetConfig (XLA's
`stream_executor.GpuTargetConfigProto`, text format) per GPU, `NAME.txtpb`, each naming its
sources. `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`
turns one into compile-only devices (experiments/compile.py `--topology=h100`)."""

from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The GPUs described here: h100, a100, ..."""
    return sorted(f.removesuffix(".txtpb") for f in os.listdir(HERE) if f.endswith(".txtpb"))


def config_text(name: str) -> str:
    """The target config of GPU `name` (one of `names()`)."""
    with open(os.path.join(HERE, f"{name}.txtpb")) as f:
        return f.read()


def field(name: str, key: str) -> float:
    """A numeric field of GPU `name`'s device info: `memory_bandwidth` (bytes/s),
    `device_memory_size` (bytes), `core_count`, ..."""
    return float(re.search(rf"\b{key}: ([\d.]+)", config_text(name)).group(1))
