"""Architecture features side by side: step time, and validation loss at equal tokens.

    python -m experiments.bench_features --config=tiny:rust [--rounds=5 --steps=5]
        [--train_steps=300] [--variants=baseline,mtp,loop,mhc,all] [--out=DIR]

Variants are the config with nothing, one, or all of the `mtp`, `loop`, `mhc` groups
enabled (their other settings as configured). Each is compiled, then timed in alternating
rounds on one fixed batch (machine noise hits all alike; median reported, with the
step-time ratio to the baseline). With `--train_steps=N > 0` each variant is then trained
by the real runner for N steps on the same batches (fresh workdir `DIR/<variant>`) and its
final validation CE and bits/byte are reported. Table printed; `DIR/features.json` written.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs.loading import load_config
from experiments.timing import alternating_rounds, medians, step_seconds
from nanochat_jax.eval.code import training_evaluators
from nanochat_jax.train.setup import setup
from nanochat_jax.train.trainer import train

FEATURES = ("mtp", "loop", "mhc")
VARIANTS = {"baseline": (), "mtp": ("mtp",), "loop": ("loop",), "mhc": ("mhc",),
            "all": FEATURES}


def variant_config(config, name: str):
    """A copy of `config` with exactly the features of variant `name` enabled."""
    c = config.copy_and_resolve_references()
    for group in FEATURES:
        c[group].enabled = group in VARIANTS[name]
    return c


def time_steps(configs: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per train step for each config, `rounds` alternating rounds of `steps`."""
    runs = {}
    for name, c in configs.items():
        built = setup(c, seed=0)
        mcfg, state, step = built.model_config, built.state, built.train_step
        rng = np.random.default_rng(0)
        batch = jnp.asarray(rng.integers(1, c.data.vocab_size,
                                         (c.data.batch_size, mcfg.seq_len + 1)), jnp.int32)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s")
        runs[name] = {"state": state, "step": step, "batch": batch}
    arms = {name: functools.partial(step_seconds, run, steps, run["batch"])
            for name, run in runs.items()}
    return alternating_rounds(
        arms, rounds, after_round=lambda n, _: print(f"timing round {n}/{rounds} done"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny:rust")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--train_steps", type=int, default=0,
                        help="also train each variant this many steps (0: timing only)")
    parser.add_argument("--out", default=os.path.join("runs", "bench", "features"))
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    config = load_config(args.config)
    configs = {name: variant_config(config, name) for name in names}

    times = time_steps(configs, args.rounds, args.steps)
    base_name = names[0]
    step_s = medians(times)
    rows = {}
    for name, c in configs.items():
        params = setup(c, abstract=True).state.params
        rows[name] = {"params": sum(int(x.size) for x in jax.tree.leaves(params)),
                      "step_ms": 1e3 * step_s[name], "rounds_ms": [1e3 * x for x in times[name]]}
    for name in names:
        rows[name]["step_time_ratio"] = rows[name]["step_ms"] / rows[base_name]["step_ms"]

    if args.train_steps:
        for name, c in configs.items():
            c.training.steps = args.train_steps
            c.training.eval_every = args.train_steps
            c.checkpoint.every = args.train_steps
            workdir = os.path.join(args.out, name)
            shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
            print(f"training {name} for {args.train_steps} steps in {workdir}")
            summary = train(c, workdir, training_evaluators(c))
            rows[name].update({"val_ce": summary["eval/ce"], "val_bpb": summary["eval/bpb"],
                               "train_loss_ce": summary["loss/ce"]})

    device = jax.devices()[0].device_kind
    b, t = config.data.batch_size, config.model.seq_len
    print(f"\nconfig {args.config}: batch {b} x seq {t}, {device}; step time = median of "
          f"{args.rounds} rounds x {args.steps} steps"
          + (f"; trained {args.train_steps} steps each" if args.train_steps else ""))
    print("| variant | params | step ms | step time / baseline | val CE | val bpb |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        val = (f"{r['val_ce']:.3f} | {r['val_bpb']:.3f}" if "val_ce" in r else "- | -")
        print(f"| {name} | {r['params']:,} | {r['step_ms']:.0f} | {r['step_time_ratio']:.2f} | "
              f"{val} |")
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "features.json")
    with open(out, "w") as f:
        json.dump({"config": args.config, "device": device, "batch": b, "seq_len": t,
                   "train_steps": args.train_steps, "variants": rows,
                   "settings": {g: config[g].to_dict() for g in FEATURES}}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
