"""Train-step time on device meshes, and with bf16 compute / FP4 backward, side by side.

    python -m experiments.bench_mesh --config=tiny [--devices=8 --rounds=5 --steps=5 --out=F]

On CPU the devices are simulated (`--xla_force_host_platform_device_count`, set here before
JAX starts): every "device" shares the same cores, so a mesh's ratio to one device measures
the partitioning and collective overhead, not a speed-up. On a GPU/TPU host the same
command times real devices. Variants are compiled first, then timed in alternating rounds;
the table gives the median step time and the ratio to one device (fp32, no FP4).
"""

from __future__ import annotations

import argparse
import os
import sys


def _set_devices(argv: list[str]) -> None:
    """Simulate --devices CPU devices: must happen before JAX is imported."""
    n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
    flag = f"--xla_force_host_platform_device_count={n}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


_set_devices(sys.argv)

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from experiments.configs.loading import load_config  # noqa: E402
from experiments.timing import alternating_rounds, medians, step_seconds  # noqa: E402
from nanochat_jax.train import sharding  # noqa: E402
from nanochat_jax.train.setup import setup  # noqa: E402


def _variant(config, shape: tuple[int, int, int], **model_fields):
    """(mesh, jitted step, state, batch) on a (data, fsdp, tensor) mesh of the first
    devices; call the step under `jax.set_mesh(mesh)` (the kernel runs per shard)."""
    n = int(np.prod(shape))
    mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(shape), sharding.AXES,
                axis_types=(AxisType.Auto,) * 3)
    config = config.copy_and_resolve_references()
    config.model.update(model_fields)
    built = setup(config, mesh, pad_id=-1, seed=0)
    b, t = config.data.batch_size, built.model_config.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, size=(b, t + 1)).astype(np.int32)
    return mesh, built.train_step, built.state, jax.device_put(tokens, built.shardings.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--out", default=None, help="JSON result file "
                        "(default runs/bench/mesh_<config>_<backend>.json)")
    args = parser.parse_args()
    config = load_config(args.config)
    d = jax.device_count()
    variants = {"1 device": ((1, 1, 1), {}),
                f"data={d}": ((d, 1, 1), {}),
                f"fsdp={d}": ((1, d, 1), {}),
                "data=2 fsdp=2 tensor=2" if d == 8 else f"data={d // 2} tensor=2":
                    ((2, 2, 2) if d == 8 else (d // 2, 1, 2), {}),
                "1 device, bf16": ((1, 1, 1), {"compute_dtype": "bfloat16"}),
                "1 device, FP4 backward (nvfp4 + Hadamard)":
                    ((1, 1, 1), {"fp4_backward": "nvfp4", "fp4_hadamard": True,
                                 "fp4_head": True})}
    runs = {}
    for name, (shape, fields) in variants.items():
        mesh, step, state, batch = _variant(config, shape, **fields)
        with jax.set_mesh(mesh):
            state, m = step(state, batch)  # compile
        jax.block_until_ready(m)
        runs[name] = {"mesh": mesh, "step": step, "state": state, "batch": batch,
                      "loss": float(m["loss/total"])}
        print(f"compiled {name}", flush=True)

    def on_mesh(run: dict) -> float:
        with jax.set_mesh(run["mesh"]):
            return step_seconds(run, args.steps, run["batch"])

    times = alternating_rounds({name: functools.partial(on_mesh, run)
                                for name, run in runs.items()}, args.rounds)
    step_s = medians(times)
    base = step_s["1 device"]
    backend = jax.default_backend()
    rows = []
    print(f"\n{args.config}, {d} {backend} devices, median of {args.rounds} rounds x "
          f"{args.steps} steps")
    print("| variant | step ms | vs 1 device | first-step loss |")
    print("|---|---|---|---|")
    for name, run in runs.items():
        ms = 1e3 * step_s[name]
        rows.append({"variant": name, "step_ms": ms, "ratio": ms / 1e3 / base,
                     "loss": run["loss"], "times": times[name]})
        print(f"| {name} | {ms:.1f} | {ms / 1e3 / base:.2f} | {run['loss']:.4f} |")
    out = args.out or os.path.join("runs", "bench", f"mesh_{args.config}_{backend}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"config": args.config, "devices": d, "backend": backend,
                   "jax": jax.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
