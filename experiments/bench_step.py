"""Train-step time of the ternary model against its dense twin, side by side in one process.

    python -m experiments.bench_step --config=tiny [--set=GROUP.FIELD=VALUE ...]
        [--rounds=5 --steps=10 --out=FILE]

Three variants (dense; ternary through the config's `model.ternary_product`, default the
packed kernel; ternary as fake quantisation) are compiled first, then timed in alternating rounds
(so machine noise hits all alike); the table gives the median step time, tokens/s, MFU
against the chip's datasheet bf16 peak (a measured matmul on a CPU: train/metrics.py
`peak_flops_per_chip`), and the step-time ratio to dense. The JSON result file is
rewritten after every round (each variant's compile time in it), so a run cut short keeps
the rounds it finished. On GPU/TPU the kernel's tiles are tuned for the step's shapes before it
compiles, as the trainer does (train/step.py `tune_kernel_tiles`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs.loading import apply_overrides, load_config
from experiments.timing import alternating_rounds, medians, step_seconds
from nanochat_jax.model import config as model_config
from nanochat_jax.train import metrics as metrics_lib
from nanochat_jax.train.setup import setup
from nanochat_jax.train.step import tune_kernel_tiles


def _variant(config, ternary: bool, product: str):
    mcfg = dataclasses.replace(model_config.from_run_config(config), ternary=ternary,
                               ternary_product=product)
    built = setup(config, model_config=mcfg, pad_id=-1, seed=0)
    return mcfg, built.state, built.train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                        help="change a config field (repeatable): model.compute_dtype=bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--out", default=None, help="JSON result file "
                        "(default runs/bench/step_<config>_<backend>.json)")
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.set)
    b, t = config.data.batch_size, config.model.seq_len
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, 256, size=(b, t + 1)), jnp.int32)

    peak, peak_from = metrics_lib.peak_flops_per_chip(config.training.peak_flops)
    device = jax.devices()[0].device_kind
    out = args.out or os.path.join("runs", "bench", f"step_{args.config}_{jax.default_backend()}"
                                    ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    print(f"config {args.config} {' '.join(args.set)}: batch {b} x seq {t}, {device}, peak "
          f"{peak / 1e12:.3f} TFLOP/s ({peak_from}), median of {args.rounds} rounds x "
          f"{args.steps} steps", flush=True)
    runs = {}
    variants = (("dense", False, "kernel"), (f"ternary ({config.model.ternary_product})", True,
                config.model.ternary_product), ("ternary (fake_quant)", True, "fake_quant"))
    for name, ternary, product in variants:
        if name in runs:  # the config's product is fake_quant already
            continue
        mcfg, state, step = _variant(config, ternary, product)
        tune_kernel_tiles(step, state, batch)
        started = time.perf_counter()
        state, m = step(state, batch)  # compile
        jax.block_until_ready(m)
        runs[name] = {"cfg": mcfg, "state": state, "step": step,
                      "compile_s": time.perf_counter() - started}
        print(f"{name}: compiled and ran one step in {runs[name]['compile_s']:.1f} s",
              flush=True)
    flops = metrics_lib.flops_per_token(runs["dense"]["cfg"], t) * b * t

    def table(times: dict[str, list[float]]) -> dict:
        rows = {}
        for name, sec in medians(times).items():
            rows[name] = {"step_ms": 1e3 * sec, "tokens_per_sec": b * t / sec,
                          "mfu": flops / sec / peak, "compile_s": runs[name]["compile_s"],
                          "rounds_ms": [1e3 * x for x in times[name]]}
        with open(out, "w") as f:
            json.dump({"config": args.config, "set": args.set, "device": device, "batch": b,
                       "seq_len": t, "peak_flops": peak, "peak_from": peak_from,
                       "rounds_done": min(len(x) for x in times.values()),
                       "variants": rows}, f, indent=1)
        return rows

    def after_round(n: int, times: dict[str, list[float]]) -> None:
        table(times)
        print(f"round {n}/{args.rounds} done", flush=True)

    arms = {name: functools.partial(step_seconds, run, args.steps, batch)
            for name, run in runs.items()}
    rows = table(alternating_rounds(arms, args.rounds, after_round=after_round))
    print("| variant | step ms | tokens/s | MFU | step time / dense |\n|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = r["step_ms"] / rows["dense"]["step_ms"]
        print(f"| {name} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | {r['mfu']:.3f} | "
              f"{ratio:.3f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
