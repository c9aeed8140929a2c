"""Ternary matmul (packed 2-bit weights, int8 activations) against a dense matmul, per shape.

    python -m experiments.bench_kernel [--impl=auto] [--rounds=5] [--out=FILE]

Shapes: decode (M = 1, 4, 16) and training (M large) for a few LLM-sized [K, N]. For each
shape both the kernel and a dense matmul of the same shape (bf16 on accelerators, fp32 on
CPU) are compiled, then timed in alternating rounds; the table gives the median time,
GFLOP/s (2MKN / t), GB/s of weight traffic (bytes of the weight operand / t: 2 bits per
weight for the kernel), and dense/kernel speedup. On GPU/TPU the kernel's tiling is tuned
per shape first (`tuning.tune_for`, cached in `tile_cache.tune_cache_path()`), and the decode
rows also give the fraction of a measured peak memory bandwidth (a large device copy) the
weight reads reach. The result file is rewritten after every row, so a run cut short keeps
the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import alternating_rounds, medians, per_call
from nanochat_jax.ternary import kernel, packing, tuning

ACCEL_SHAPES = {"decode": [(m, k, n) for m in (1, 16) for k, n in ((4096, 4096),
                                                                  (4096, 11008))],
                "train": [(4096, k, n) for k, n in ((4096, 4096), (4096, 11008))]}
CPU_SHAPES = {"decode": [(m, k, n) for m in (1, 4, 16) for k, n in ((1024, 4096),
                                                                   (2048, 2048))],
              "train": [(512, k, n) for k, n in ((1024, 4096), (2048, 2048))]}


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Device memory bandwidth in B/s from a copy of n_bytes (read + write)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * n_bytes / min(per_call(lambda: copy(x), 1, warmup=True) for _ in range(repeats))


def bench_shape(m: int, k: int, n: int, impl: str, rounds: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    accel = jax.default_backend() != "cpu"
    dense_dtype = jnp.bfloat16 if accel else jnp.float32
    x8 = jnp.asarray(rng.integers(-127, 128, size=(m, k)), jnp.int8)
    w = packing.pack(jnp.asarray(rng.normal(size=(k, n)), jnp.float32))
    xd = jnp.asarray(rng.normal(size=(m, k)), dense_dtype)
    wd = jnp.asarray(rng.normal(size=(k, n)), dense_dtype)
    tern = jax.jit(lambda a, b: kernel.ternary_matmul(a, b, impl=impl))
    tuning.tune_for(tern, x8, w)  # the tilings first, on concrete arrays (none while tracing)
    dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    times = medians(alternating_rounds(
        {"ternary": lambda: per_call(lambda: tern(x8, w), repeats, warmup=True),
         "dense": lambda: per_call(lambda: dense(xd, wd), repeats, warmup=True)}, rounds))
    t_tern, t_dense = times["ternary"], times["dense"]
    flops = 2.0 * m * k * n
    return {"m": m, "k": k, "n": n,
            "ternary_us": 1e6 * t_tern, "dense_us": 1e6 * t_dense,
            "ternary_gflops": flops / t_tern / 1e9, "dense_gflops": flops / t_dense / 1e9,
            "ternary_weight_gbs": w.nbytes / t_tern / 1e9,
            "dense_weight_gbs": wd.nbytes / t_dense / 1e9,
            "speedup": t_dense / t_tern}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="auto", choices=kernel.IMPLS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="calls per timed round")
    parser.add_argument("--out", default=None,
                        help="JSON result file (default runs/bench/kernel_<backend>.json)")
    args = parser.parse_args()
    backend = jax.default_backend()
    shapes = CPU_SHAPES if backend == "cpu" else ACCEL_SHAPES
    impl = kernel.resolve_impl(args.impl)
    bandwidth = None if backend == "cpu" else measure_bandwidth()
    device = jax.devices()[0].device_kind
    print(f"{device} ({backend}), ternary impl {impl}, dense "
          f"{'fp32' if backend == 'cpu' else 'bf16'}; median of {args.rounds} alternating "
          f"rounds x {args.repeats} calls"
          + (f"; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""))
    header = ("| kind | M | K | N | ternary us | dense us | speedup | ternary GFLOP/s | "
              "dense GFLOP/s | ternary weight GB/s | dense weight GB/s |"
              + (" ternary % of bandwidth |" if bandwidth else ""))
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    out = args.out or os.path.join("runs", "bench", f"kernel_{backend}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    rows = []
    for kind, kind_shapes in shapes.items():
        for m, k, n in kind_shapes:
            r = {"kind": kind, **bench_shape(m, k, n, impl, args.rounds, args.repeats)}
            if bandwidth and kind == "decode":
                r["ternary_bandwidth_fraction"] = r["ternary_weight_gbs"] * 1e9 / bandwidth
            rows.append(r)
            line = (f"| {kind} | {m} | {k} | {n} | {r['ternary_us']:.1f} | {r['dense_us']:.1f} | "
                    f"{r['speedup']:.2f} | {r['ternary_gflops']:.1f} | {r['dense_gflops']:.1f} | "
                    f"{r['ternary_weight_gbs']:.2f} | {r['dense_weight_gbs']:.2f} |")
            if bandwidth:
                frac = r.get("ternary_bandwidth_fraction")
                line += f" {100 * frac:.1f} |" if frac is not None else " |"
            print(line, flush=True)
            with open(out, "w") as f:  # after every row: a run cut short keeps what it did
                json.dump({"device": device, "backend": backend, "impl": impl,
                           "bandwidth_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
