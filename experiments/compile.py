"""Compile the real train step (and the inference engine's decode step) for a TPU topology or
NVIDIA GPUs, ahead of time, on any machine: per-device memory, FLOPs, compile time, fits.

    python -m experiments.compile --topology=v5e:2x2 --config=base [--config.X=Y ...]
        [--mesh=data=1,fsdp=4,tensor=1] [--decode_batch=8] [--out=FILE.jsonl]
    python -m experiments.compile --topology=h100 --config=base      # h100x8, a100, h200, b200

No accelerator is needed: `jax.experimental.topologies` describes the chips as compile-only
devices (TPU: `libtpu`, `pip install -e '.[tpu]'`; GPU: jax's CUDA plugin and compiler,
`pip install -e '.[cuda]'`, with the GPU described by a GpuTargetConfig in
experiments/targets/), the run config's mesh is laid over them, and
`setup(config, mesh, abstract=True).train_step.lower(state, batch).compile()` runs XLA's TPU or GPU
compiler on the same step `experiments.run` trains with, the Pallas kernel through Mosaic or
Triton down to machine code (MaxText's `train_compile.py` does the same for TPUs). The
decode step is `Engine.lower_decode_step` with the packed weights. The report gives, per
step and per device, the bytes of arguments, outputs and temporaries from the compiled
executable's memory analysis, its FLOPs (XLA's cost analysis with the Pallas kernel's own
estimate; on GPUs, which have none, the model's own count), the time those FLOPs take at
the chip's bf16 peak, the number of Pallas kernel calls (Mosaic or Triton) in the compiled
program, and whether the total fits the memory the program can have: on TPU what the
compiler reports as available, on GPU the device memory times JAX's allocator fraction.
"""

from __future__ import annotations

import os

# Nothing runs on a local device: keep JAX on the CPU (no TPU backend start-up, even on a
# TPU host: libtpu starts only to compile, in `tpu_topology`, with its settings for a host
# without a TPU), and let jax's CUDA plugin load on a host without a GPU driver (it checks
# the driver's version otherwise).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import targets  # noqa: E402
from experiments.configs.loading import (  # noqa: E402
    config_argv,
    define_config_flag,
    parse_flags,
)
from nanochat_jax.errors import ConfigError  # noqa: E402
from nanochat_jax.train.sharding import tpu_topology  # noqa: E402

CONFIG = define_config_flag()

_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x2", "TPU topology, GENERATION:SHAPE (v5e:2x2, v4:2x2x1, v5p:2x2x1, "
    "v6e:2x2, v5e:4x4, ...); NVIDIA GPUs on one host, GPU[xN] with GPU a target config of "
    "experiments/targets/ (h100, h100x8, a100, h200, b200x8, ...); or cpu: this host's CPU "
    "devices (what a CPU run compiles)")
_MESH = flags.DEFINE_string(
    "mesh", None, "data=N,fsdp=N,tensor=N (-1: the rest of the chips); default: the config's "
    "mesh group")
_DECODE_BATCH = flags.DEFINE_integer(
    "decode_batch", None, "rows of the decode step compiled after the train step (0: skip "
    "it; default 8, rounded up to a multiple of mesh.data x mesh.fsdp so the rows and the "
    "KV cache split over them)")
_OUT = flags.DEFINE_string("out", None, "append one JSON line per compiled step to this file")
_RENDER = flags.DEFINE_string(
    "render", None, "compile nothing: print the markdown table of the rows in this JSONL file "
    "(written by --out), one row per compiled step with the command that made it")

GPU_TOPOLOGY = re.compile(r"^(?P<gpu>[a-z]+\d+)(x(?P<count>[1-9]\d*))?$")
# What JAX's GPU allocator takes of the device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (it preallocates this share at start-up; a program must fit in it).
GPU_MEMORY_FRACTION = 0.75
KERNEL_CALLS = ('custom_call_target="tpu_custom_call"',  # Mosaic (TPU)
                'custom_call_target="__gpu$xla.gpu.triton"')  # Triton (GPU): Pallas calls


def gpu_target(name: str) -> tuple[str, int] | None:
    """(GPU, count) of a GPU topology name ("h100" -> ("h100", 1), "h100x8" -> ("h100", 8));
    None for a name that is not one of experiments/targets/."""
    found = GPU_TOPOLOGY.match(name)
    if not found or found["gpu"] not in targets.names():
        return None
    return found["gpu"], int(found["count"] or 1)


def topology(name: str):
    """The compile-only description of a TPU topology ("v5e:2x2") or of N GPUs of one kind
    on one host ("h100x8"): `.devices`."""
    from jax.experimental import topologies

    gpu = gpu_target(name)
    if gpu is not None:
        gpu_name, count = gpu
        return topologies.get_topology_desc(platform="cuda",
                                            target_config=targets.config_text(gpu_name),
                                            topology=f"1x1x{count}")
    if ":" not in name:
        raise ConfigError(f"--topology={name}: not a TPU topology (GENERATION:SHAPE, e.g. "
                          f"v5e:2x2) nor a GPU of experiments/targets/ "
                          f"({', '.join(targets.names())}, optionally xN)")
    return tpu_topology(name)


def usable_memory(device, topology_name: str) -> float | None:
    """Bytes one device can give a program. TPU: what XLA's TPU compiler reports as
    available HBM (asked by compiling a program too large for it: v5e 15.75 GiB of 16);
    GPU: the target config's device memory times JAX's allocator fraction
    ($XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75); None elsewhere."""
    import jax
    import jax.numpy as jnp

    gpu = gpu_target(topology_name)
    if gpu is not None:
        total = targets.field(gpu[0], "device_memory_size")
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
        return total * fraction
    if device.platform != "tpu":
        return None
    one = jax.sharding.Mesh(np.asarray([device]), ("x",))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.NamedSharding(
        one, jax.sharding.PartitionSpec()))

    def too_large(a):  # 20 live 8 GiB arrays: more than any TPU has
        rows = [jnp.arange(2**31 - 2, dtype=jnp.float32) * a + i for i in range(20)]
        return sum(jnp.sum(r) for r in jax.lax.sort(rows, num_keys=1))

    try:
        jax.jit(too_large).lower(scalar).compile()
    except jax.errors.JaxRuntimeError as e:
        found = re.search(r"exceeds available HBM \(([\d.]+[KMGT])\)", str(e))
        if found:
            return _gigabytes(found.group(1))
    return None


def _mesh_fields(text: str) -> dict[str, int]:
    from nanochat_jax.model.axes import AXES

    fields = {}
    for item in filter(None, text.split(",")):
        axis, _, size = item.partition("=")
        if axis not in AXES or not size.lstrip("-").isdigit():
            raise ConfigError(f"--mesh={text}: expected AXIS=N,... with AXIS in "
                              f"{', '.join(AXES)}")
        fields[axis] = int(size)
    return fields


def _memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled executable: arguments, outputs, temporaries, and the
    total live at once (outputs aliased to donated arguments counted once)."""
    m = compiled.memory_analysis()
    out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
           "code_bytes": m.generated_code_size_in_bytes}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"] + out["code_bytes"])
    return out


def _flops(stage) -> float | None:
    """XLA's FLOP count of a compiled program (None where the backend has no cost analysis:
    GPU)."""
    cost = stage.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _gigabytes(text: str) -> float:
    number, unit = float(text[:-1]), text[-1]
    return number * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def _report(name: str, lowered, chip, hbm: float | None, model_flops: float,
            started: float) -> dict:
    """One row: the compiled step's memory, FLOPs (XLA's, else `model_flops`: the model's
    own count per device), Pallas kernel calls, and whether it fits in `hbm` bytes; or,
    where XLA refuses it for lack of memory, the temporaries it asked for."""
    import jax

    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"HLO temporaries \(([\d.]+[KMGT])\) exceeds available HBM "
                         r"\(([\d.]+[KMGT])\)", str(e))
        row = {"step": name, "compile_s": time.perf_counter() - started, "fits": False,
               "flops": None, "kernel_calls": None, "total_bytes": None,
               "error": str(e).splitlines()[0][:300]}
        if need:
            row.update(temp_bytes=_gigabytes(need.group(1)), hbm_bytes=_gigabytes(need.group(2)))
        if hbm is not None:
            row.setdefault("hbm_bytes", hbm)
        return row
    text = compiled.as_text()
    flops = _flops(compiled)
    row = {"step": name, "compile_s": time.perf_counter() - started, **_memory(compiled),
           "flops": model_flops if flops is None else flops,
           "flops_from": "model" if flops is None else "compiler",
           "kernel_calls": sum(text.count(call) for call in KERNEL_CALLS)}
    if hbm is not None:
        row.update(hbm_bytes=hbm, fits=row["total_bytes"] <= hbm)
    if chip is not None:
        row.update(seconds_at_peak=row["flops"] / chip.bf16_flops)
    return row


def compile_steps(config, topology_name: str, decode_batch: int | None = None
                  ) -> tuple[dict, list[dict]]:
    """Compile the train step (and the decode step: `decode_batch` rows, None: 8 rounded up
    to a multiple of the batch shards, 0: none) of `config` for `topology_name`.
    -> (what was compiled, one report row per step)."""
    import jax
    import jax.numpy as jnp

    from nanochat_jax.infer.engine import Engine
    from nanochat_jax.model.axes import AXES
    from nanochat_jax.model.config import resolve_compute_dtype
    from nanochat_jax.model.packed import pack_params
    from nanochat_jax.model.params import unscan, unscanned
    from nanochat_jax.model.transformer import Transformer
    from nanochat_jax.ternary import kernel
    from nanochat_jax.train import metrics, sharding
    from nanochat_jax.train.setup import setup
    from nanochat_jax.train.validate import validate

    filtering = config.get("collider")
    if filtering and filtering.enabled and filtering.score == "excess_loss":
        raise ConfigError("collider.score=excess_loss needs a reference run's checkpoint; "
                          "compile with collider.score=loss (the same step cost)")
    from jax.experimental import topologies

    if topology_name == "cpu":  # this host: the step `experiments.run` would compile here
        mesh = sharding.make_mesh(config.mesh)
        devices = list(mesh.devices.flat)
        sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
        mcfg = validate(config, len(devices))
    else:
        described = topology(topology_name)
        devices = described.devices
        mcfg = validate(config, len(devices))  # the runner's own checks, for these chips
        sizes = sharding.mesh_shape(config.mesh, len(devices))
        laid_out = topologies.make_mesh(described, tuple(sizes.values()), AXES)  # ICI-aware
        mesh = jax.sharding.Mesh(laid_out.devices, AXES,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
    data = config.data
    if decode_batch is None:
        decode_batch = -(-8 // (sizes["data"] * sizes["fsdp"])) * sizes["data"] * sizes["fsdp"]
    chip = metrics.chip(devices[0].device_kind)
    hbm = usable_memory(devices[0], topology_name)  # else (a TPU the probe cannot fill):
    if hbm is None and chip is not None:  # the datasheet's figure
        hbm = chip.hbm_bytes
    platform = devices[0].platform
    info = {"config": config.model.preset, "topology": topology_name, "chips": len(devices),
            "device_kind": devices[0].device_kind, "platform": platform, "mesh": sizes,
            "ternary_impl": mcfg.ternary_product if not mcfg.uses_kernel else
            f"{mcfg.kernel_backend} -> "
            f"{kernel.resolve_impl(mcfg.kernel_backend, platform)}",
            "ternary": mcfg.ternary, "remat": mcfg.remat, "scan_layers": mcfg.scan_layers,
            "loops": mcfg.loops,
            "compute_dtype": resolve_compute_dtype(mcfg.compute_dtype, platform),
            "optimizer": config.optimizer.name, "batch": data.batch_size, "seq_len": mcfg.seq_len}
    built = setup(config, mesh, model_config=mcfg, abstract=True)
    tokens = jax.ShapeDtypeStruct((data.batch_size, mcfg.seq_len + 1), jnp.int32,
                                  sharding=built.shardings.batch)
    reports = []
    with jax.set_mesh(mesh):
        started = time.perf_counter()
        lowered = built.train_step.lower(built.state, tokens)
        per_token = metrics.flops_per_token(mcfg, mcfg.seq_len)  # forward + backward
        model_flops = per_token * data.batch_size * mcfg.seq_len / len(devices)
        row = _report(f"train (batch {data.batch_size} x {mcfg.seq_len})", lowered, chip, hbm,
                      model_flops, started)
        row["model_flops"] = model_flops
        reports.append(row)
        if decode_batch:
            replicated = sharding.replicated(mesh)
            variables = jax.eval_shape(lambda p: pack_params(unscan(mcfg, p)[1]),
                                       built.state.params)
            variables = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), variables)
            split = decode_batch % (sizes["data"] * sizes["fsdp"]) == 0
            rows_sharding = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(
                ("data", "fsdp") if split else None))
            started = time.perf_counter()
            lowered = Engine(Transformer(unscanned(mcfg)), variables).lower_decode_step(
                decode_batch, mcfg.seq_len, rows=rows_sharding)
            # one token per row through the forward (a third of a training token's FLOPs)
            decode_flops = per_token / 3 * decode_batch / len(devices)
            reports.append(_report(f"decode (batch {decode_batch}, cache {mcfg.seq_len})",
                                   lowered, chip, hbm, decode_flops, started))
    return info, reports


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _tflop(flops: float | None) -> str:
    return "-" if flops is None else f"{flops / 1e12:.2f}"


def _flops_cell(row: dict) -> str:
    cell = _tflop(row["flops"])
    return f"{cell} (model)" if row.get("flops_from") == "model" else cell


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def print_report(info: dict, reports: list[dict]) -> None:
    mesh = ", ".join(f"{k}={v}" for k, v in info["mesh"].items())
    print(f"{info['config']} ({'ternary ' + info['ternary_impl'] if info['ternary'] else 'dense'}"
          f", remat {info['remat']}, {info['compute_dtype']}, {info['optimizer']}) on "
          f"{info['topology']}: {info['chips']} x {info['device_kind']}, mesh {mesh}")
    lowering = "Triton" if info["platform"] == "gpu" else "Mosaic"
    header = ("| step | compile s | arguments GiB | temporaries GiB | total GiB / device | "
              f"HBM GiB | fits | TFLOP / device | ms at bf16 peak | {lowering} kernel calls |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in reports:
        hbm = _gib(r["hbm_bytes"]) if "hbm_bytes" in r else "?"
        fits = ("yes" if r["fits"] else "NO") if "fits" in r else "?"
        print(f"| {r['step']} | {r['compile_s']:.1f} | {_gib(r.get('argument_bytes'))} | "
              f"{_gib(r.get('temp_bytes'))} | {_gib(r['total_bytes'])} | {hbm} | {fits} | "
              f"{_flops_cell(r)} | {_ms(r.get('seconds_at_peak'))} | "
              f"{_or_dash(r['kernel_calls'])} |")
    if any(r.get("flops_from") == "model" for r in reports):
        print("TFLOP marked (model): XLA's cost analysis has none for this backend; the "
              "model's own count (train/metrics.flops_per_token) per device")
    if info["platform"] == "gpu":
        print(f"HBM: the device memory times JAX's GPU allocator fraction "
              f"(XLA_PYTHON_CLIENT_MEM_FRACTION, default {GPU_MEMORY_FRACTION})")
    for r in reports:
        if "error" in r:
            print(f"{r['step']}: XLA refused it: {r['error']}")


def render(path: str) -> str:
    """The markdown table of a JSONL file of compile rows (BUILD.md's pod table)."""
    lines = ["| model | topology | mesh | ternary | remat | blocks | step | total GiB / device | "
             "HBM GiB | fits | TFLOP / device | ms at bf16 peak | kernel calls | compile s |",
             "|" + "---|" * 14]
    commands = []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        if r["command"] not in commands:
            commands.append(r["command"])
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v != 1) or "1 chip"
        fits = "yes" if r.get("fits") else (
            "**no**" if r["total_bytes"] is not None
            else f"**no**: temporaries {_gib(r.get('temp_bytes'))}")
        blocks = ("scanned" if r.get("scan_layers") else "unrolled") + (
            f", {r['loops']} loops" if r.get("loops", 1) > 1 else "")
        lines.append(
            f"| {r['config']} | {r['topology']} | {mesh} | {r['ternary_impl']} | {r['remat']} | "
            f"{blocks} | {r['step'].split(' ')[0]} | {_gib(r['total_bytes'])} | "
            f"{_gib(r.get('hbm_bytes'))} | "
            f"{fits} | {_flops_cell(r)} | {_ms(r.get('seconds_at_peak'))} | "
            f"{_or_dash(r.get('kernel_calls'))} | {r['compile_s']:.0f} | "
            f"[{commands.index(r['command']) + 1}] |")
    lines[0] += " command |"
    lines[1] += "---|"
    lines.append("")
    lines += [f"[{i + 1}] `{c}`" + "  " for i, c in enumerate(commands)]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _RENDER.value:
        print(render(_RENDER.value))
        return
    from nanochat_jax.errors import NanochatError
    from nanochat_jax.train.step import cpu_schedule_flags

    config = CONFIG.value
    try:  # before JAX starts its CPU backend (as experiments.run does)
        os.environ["XLA_FLAGS"] = cpu_schedule_flags(config.training.cpu_schedule,
                                                     os.environ.get("XLA_FLAGS", ""))
        if _MESH.value:
            with config.unlocked():
                config.mesh.update(_mesh_fields(_MESH.value))
        info, reports = compile_steps(config, _TOPOLOGY.value, _DECODE_BATCH.value)
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    except (ImportError, NotImplementedError) as e:  # no libtpu / no CUDA plugin
        needs = ("NVIDIA GPUs need jax's CUDA plugin and compiler: pip install -e '.[cuda]'"
                 if gpu_target(_TOPOLOGY.value) else "TPU needs libtpu: pip install -e '.[tpu]'")
        raise SystemExit(f"error: {e}: compiling for {needs}") from None
    print_report(info, reports)
    if _OUT.value:
        command = " ".join(["python -m experiments.compile", *sys.argv[1:]])
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "a") as f:
            for r in reports:
                f.write(json.dumps({**info, **r, "command": command}) + "\n")
        print(f"appended {len(reports)} rows to {_OUT.value}")


def run() -> None:
    argv, _ = config_argv(sys.argv)
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
