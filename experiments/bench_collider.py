"""Collider's backward savings: forward, backward and whole-step time at several keep ratios.

    python -m experiments.bench_collider [--keep=1.0,0.7,0.5,0.3] [--d_model=512 ...]
        [--rounds=5 --steps=3 --out=FILE]

One process, one batch, a model whose block matmuls dominate (default d_model 512, 4
layers, d_ff 1536, vocab 1024, 8 x 256 tokens). Variants: no filtering, then Collider at
each keep ratio. For each: forward = the jitted loss, forward+backward = the jitted
`value_and_grad`, backward = their difference, step = the whole train step (optimizer
included). Timed in alternating rounds (noise hits all alike); medians and ratios to the
unfiltered run are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import base
from experiments.timing import alternating_rounds, medians, per_call, step_seconds
from nanochat_jax.collider import Carrier
from nanochat_jax.losses import lm_objective
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.train.setup import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default="1.0,0.7,0.5,0.3")
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--d_ff", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ternary", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="calls per timed round")
    parser.add_argument("--out", default=os.path.join("runs", "bench", "collider.json"))
    args = parser.parse_args()
    keeps = [float(k) for k in args.keep.split(",")]

    mcfg = model_config("tiny", vocab_size=args.vocab, seq_len=args.seq_len,
                        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                        n_kv_heads=args.n_heads, d_ff=args.d_ff, ternary=bool(args.ternary))
    config = base.get_config()
    config.training.steps = 1000
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, args.vocab, (args.batch, args.seq_len + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = targets != 0

    variants = {"unfiltered": None, **{f"keep {k:g}": k for k in keeps}}
    fns, states, state0 = {}, {}, None
    for name, keep in variants.items():
        variant = config.copy_and_resolve_references()
        variant.collider.enabled = keep is not None
        if keep is not None:
            variant.collider.keep_ratio = keep
        built = setup(variant, model_config=mcfg, seed=0)  # the same initial state in every variant
        model, obj, states[name] = built.model, built.objective, built.state
        if state0 is None:  # the forward passes' parameters (the steps donate theirs)
            state0 = jax.tree.map(jnp.copy, built.state)

        def loss_fn(params, obj=obj, model=model):
            carrier = (None if obj.keep_ratio is None
                       else Carrier.start(inputs.shape, obj.keep_ratio))
            out = model.apply({"params": params}, inputs, carrier=carrier,
                              method=Transformer.forward)
            return lm_objective(out, targets, mask, obj, jnp.asarray(0))[0]

        fns[name] = {"forward": jax.jit(loss_fn),
                     "forward_backward": jax.jit(jax.value_and_grad(loss_fn)),
                     "step": built.train_step}
        print(f"{name}: compiling")
        fns[name]["forward_backward"](state0.params)
        states[name], _ = fns[name]["step"](states[name], tokens)

    parts = ("forward", "forward_backward", "step")
    arms = {}  # each round: every variant's forward, forward+backward, then its step
    for name, f in fns.items():
        for part in parts[:2]:  # an untimed call first (`forward` compiles in round 1's)
            arms[name, part] = functools.partial(
                per_call, functools.partial(f[part], state0.params), args.steps, warmup=True)
        arms[name, "step"] = functools.partial(
            step_seconds, {"state": states[name], "step": f["step"]}, args.steps, tokens)
    times = alternating_rounds(
        arms, args.rounds, after_round=lambda n, _: print(f"round {n}/{args.rounds} done"))

    rows = {}
    for name in fns:
        rounds = {part: times[name, part] for part in parts}
        med = {part: 1e3 * sec for part, sec in medians(rounds).items()}
        bwd = [1e3 * (fb - fw) for fb, fw in zip(rounds["forward_backward"], rounds["forward"],
                                                 strict=True)]
        rows[name] = {"forward_ms": med["forward"], "backward_ms": statistics.median(bwd),
                      "step_ms": med["step"], "rounds": rounds}
    ref = rows["unfiltered"]
    device = jax.devices()[0].device_kind
    print(f"\n{device}; model d_model {args.d_model}, {args.n_layers} layers, d_ff {args.d_ff}, "
          f"vocab {args.vocab}, {'ternary' if args.ternary else 'dense'}; batch {args.batch} x "
          f"{args.seq_len}; median of {args.rounds} rounds x {args.steps} calls")
    print("| variant | forward ms | backward ms | step ms | backward / unfiltered | "
          "step / unfiltered |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        row["backward_ratio"] = row["backward_ms"] / ref["backward_ms"]
        row["step_ratio"] = row["step_ms"] / ref["step_ms"]
        print(f"| {name} | {row['forward_ms']:.0f} | {row['backward_ms']:.0f} | "
              f"{row['step_ms']:.0f} | {row['backward_ratio']:.3f} | {row['step_ratio']:.3f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"device": device, "model": dataclasses.asdict(mcfg), "batch": args.batch,
                   "variants": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
