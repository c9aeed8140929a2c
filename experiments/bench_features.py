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
import json
import os
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.run import load_config
from nanochat_jax.eval.code import training_evaluators
from nanochat_jax.model import config as model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.optim.factory import build_optimizer
from nanochat_jax.train.state import init_train_state
from nanochat_jax.train.step import build_objective, make_train_step
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
        mcfg = model_config.from_run_config(c)
        model = Transformer(mcfg)
        tx, lr_fn = build_optimizer(c.optimizer, c.training.steps)
        state = init_train_state(model, tx, 0, mcfg.seq_len)
        step = make_train_step(model, tx, lr_fn, build_objective(c, pad_id=0))
        rng = np.random.default_rng(0)
        batch = jnp.asarray(rng.integers(1, c.data.vocab_size,
                                         (c.data.batch_size, mcfg.seq_len + 1)), jnp.int32)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s")
        runs[name] = {"state": state, "step": step, "batch": batch, "times": []}
    for r in range(rounds):
        for run in runs.values():
            state = run["state"]
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = run["step"](state, run["batch"])
            jax.block_until_ready(m)
            run["times"].append((time.perf_counter() - t0) / steps)
            run["state"] = state
        print(f"timing round {r + 1}/{rounds} done")
    return {name: run["times"] for name, run in runs.items()}


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
    rows = {}
    for name, c in configs.items():
        shapes = jax.eval_shape(Transformer(model_config.from_run_config(c)).init,
                                jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
        sec = statistics.median(times[name])
        rows[name] = {"params": sum(int(x.size) for x in jax.tree.leaves(shapes)),
                      "step_ms": 1e3 * sec, "rounds_ms": [1e3 * x for x in times[name]]}
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
