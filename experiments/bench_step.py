"""Train-step time of the ternary model against its dense twin, side by side in one process.

    python -m experiments.bench_step --config=tiny [--set=GROUP.FIELD=VALUE ...]
        [--rounds=5 --steps=10 --out=FILE]

Three variants (dense; ternary through the config's `model.ternary_impl`, default the packed
kernel; ternary as fake quantisation) are compiled first, then timed in alternating rounds
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
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.run import apply_overrides, load_config
from nanochat_jax.model import config as model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer
from nanochat_jax.train import metrics as metrics_lib
from nanochat_jax.train.state import init_train_state
from nanochat_jax.train.step import build_objective, make_train_step, tune_kernel_tiles


def _variant(config, ternary: bool, impl: str):
    mcfg = dataclasses.replace(model_config.from_run_config(config), ternary=ternary,
                               ternary_impl=impl)
    model = Transformer(mcfg)
    tx, lr_fn = build_optimizer(config.optimizer, config.training.steps)
    state = init_train_state(model, tx, 0, mcfg.seq_len)
    step = make_train_step(model, tx, lr_fn, build_objective(config, pad_id=-1))
    return mcfg, state, step


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
    variants = (("dense", False, "auto"), (f"ternary ({config.model.ternary_impl})", True,
                config.model.ternary_impl), ("ternary (fake_quant)", True, "fake_quant"))
    for name, ternary, impl in variants:
        if name in runs:  # the config's impl is fake_quant already
            continue
        mcfg, state, step = _variant(config, ternary, impl)
        tune_kernel_tiles(step, state, batch)
        started = time.perf_counter()
        state, m = step(state, batch)  # compile
        jax.block_until_ready(m)
        runs[name] = {"cfg": mcfg, "state": state, "step": step, "times": [],
                      "compile_s": time.perf_counter() - started}
        print(f"{name}: compiled and ran one step in {runs[name]['compile_s']:.1f} s",
              flush=True)
    flops = metrics_lib.flops_per_token(runs["dense"]["cfg"], t) * b * t

    def table() -> dict:
        rows = {}
        for name, run in runs.items():
            if run["times"]:
                sec = statistics.median(run["times"])
                rows[name] = {"step_ms": 1e3 * sec, "tokens_per_sec": b * t / sec,
                              "mfu": flops / sec / peak, "compile_s": run["compile_s"],
                              "rounds_ms": [1e3 * x for x in run["times"]]}
        with open(out, "w") as f:
            json.dump({"config": args.config, "set": args.set, "device": device, "batch": b,
                       "seq_len": t, "peak_flops": peak, "peak_from": peak_from,
                       "rounds_done": min(len(r["times"]) for r in runs.values()),
                       "variants": rows}, f, indent=1)
        return rows

    for round_index in range(args.rounds):
        for run in runs.values():
            state = run["state"]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = run["step"](state, batch)
            jax.block_until_ready(m)
            run["times"].append((time.perf_counter() - t0) / args.steps)
            run["state"] = state
        table()
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    rows = table()
    print("| variant | step ms | tokens/s | MFU | step time / dense |\n|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = r["step_ms"] / rows["dense"]["step_ms"]
        print(f"| {name} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | {r['mfu']:.3f} | "
              f"{ratio:.3f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
