"""Collider, honestly: how close its gradient is to the exact one, what it saves, what it costs.

    python -m experiments.collider_study [--steps=100 --seq_len=128 --keeps=0.7,0.5 --out=DIR]

1. Training, one process per run (experiments.benchmark's runner and data): tiny ternary
   AdamW on rust-src at keep 1.0 (Collider on, every token kept: the exact gradient), then
   each of `--keeps` (0.7 and 0.5), each scoring tokens by their loss and by their excess
   loss over a reference. The reference is an early checkpoint of the same run: the keep-1.0 run's
   step `--ref_step` (20 of 100), cheap, as Rho-1 suggests, not a finished model.
2. Fidelity, on the keep-1.0 run's final weights: per layer (the embedding, each block, the
   final norm, the head), the cosine between Collider's gradient (backward on the kept rows
   only) and the exact gradient of the same kept-token loss (`collider.sparse_backward=
   False`), at the training sequence length and at 4x it. The approximation drops the path
   from kept queries through dropped tokens' keys and values, which grows with the context.
3. Backward time: `python -m experiments.bench_collider` at the training shape.

Writes DIR/report.md and DIR/results.json (default docs/benchmarks/collider).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark.report import save_study
from experiments.benchmark.runner import run_one
from nanochat_jax.data.pipeline import open_data
from nanochat_jax.train.checkpoint import load_run
from nanochat_jax.train.setup import setup
from nanochat_jax.train.step import grads_and_metrics

KEEPS = (0.7, 0.5)
SCORES = ("loss", "excess_loss")


def common_overrides(args) -> list[str]:
    """The benchmark's quick-run settings for every training run of the study."""
    return ["--config.model.preset=tiny", f"--config.training.steps={args.steps}",
            f"--config.model.n_layers={args.n_layers}",
            f"--config.model.seq_len={args.seq_len}", f"--config.data.batch_size={args.batch}",
            "--config.data.source=rust-src", f"--config.data.vocab_size={args.vocab}",
            f"--config.model.vocab_size={args.vocab}", f"--config.data.max_bytes={args.max_bytes}",
            "--config.optimizer.lr=3e-3",
            f"--config.optimizer.warmup_steps={max(1, args.steps // 10)}",
            f"--config.training.eval_every={max(1, args.steps // 8)}",
            f"--config.training.log_every={max(1, args.steps // 10)}",
            "--config.training.eval_batches=4", f"--config.checkpoint.every={args.ref_step}",
            "--config.checkpoint.max_to_keep=100", "--config.training.peak_flops=1e11",
            "--config.collider.enabled=True"]


def early_reference(out: str, workdir: str, step: int) -> str:
    """A run directory holding only `workdir`'s checkpoint at `step` (what
    `collider.reference` loads: its newest checkpoint)."""
    ref = os.path.join(out, "runs", f"reference_step{step}")
    shutil.rmtree(ref, ignore_errors=True)
    shutil.copytree(os.path.join(workdir, "checkpoints", str(step)),
                    os.path.join(ref, "checkpoints", str(step)))
    return ref


def layer_cosines(workdir: str, cells: list[tuple[float, int]], batches: int = 2
                  ) -> dict[str, dict[str, float]]:
    """For each (keep ratio, sequence length) cell, "keep@seq_len": per top-level parameter
    group, the cosine between Collider's gradient and the exact gradient of the kept-token
    loss, summed over `batches` validation batches of that length. The run is loaded once."""
    config, state, _ = load_run(workdir)
    config.collider.enabled = True
    vals = {t: open_data(config, t, say=lambda *_: None)[2] for t in {t for _, t in cells}}
    fidelity = {}
    for keep, seq_len in cells:
        config.collider.keep_ratio = keep
        grads = {}
        for sparse in (True, False):
            config.collider.sparse_backward = sparse
            built = setup(config, abstract=True)  # the run's model and this objective
            fn = jax.jit(lambda params, tokens, built=built: grads_and_metrics(
                params, tokens, jnp.asarray(10**6), None, jax.random.key(0),
                model=built.model, objective=built.objective)[1])
            total = None
            for i in range(batches):
                g = fn(state.params, jnp.asarray(vals[seq_len].batch(i)))
                total = g if total is None else jax.tree.map(jnp.add, total, g)
            grads[sparse] = total
        out = {}
        for name in grads[True]:
            a, b = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(grads[s][name])])
                    for s in (True, False))
            out[name] = float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
        fidelity[f"{keep}@{seq_len}"] = out
    return fidelity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS)),
                        help="keep ratios below 1 to train and measure (keep 1.0 always runs)")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192, help="BPE ids")
    parser.add_argument("--max_bytes", type=int, default=0,
                        help="read at most this much of the corpus (0: all)")
    parser.add_argument("--n_layers", type=int, default=4, help="the tiny preset's 4")
    parser.add_argument("--rounds", type=int, default=5, help="bench_collider's rounds")
    parser.add_argument("--ref_step", type=int, default=20,
                        help="the early checkpoint used as the excess-loss reference")
    parser.add_argument("--out", default=os.path.join("docs", "benchmarks", "collider"))
    args = parser.parse_args(argv)
    try:
        keeps = tuple(float(k) for k in args.keeps.split(",") if k)
    except ValueError:
        parser.error(f"--keeps={args.keeps}: expected comma-separated ratios, e.g. 0.7,0.5")
    if not keeps or not all(0 < k < 1 for k in keeps):
        parser.error(f"--keeps={args.keeps}: each ratio must be in (0, 1)")
    if not 0 < args.ref_step < args.steps or args.steps % args.ref_step:
        parser.error("--ref_step must divide --steps and be smaller than it")
    if os.path.exists(os.path.join(args.out, "results.json")):
        raise SystemExit(f"error: {args.out} already holds a study; choose another --out")
    os.makedirs(args.out, exist_ok=True)
    common = common_overrides(args)
    runs = {}

    def train(name, overrides):
        print(f"training {name} ...", flush=True)
        runs[name] = run_one(name, "base", common + overrides, args.out)
        print(f"    val CE {runs[name]['val_ce']:.3f}, {runs[name]['wall_s']:.0f} s", flush=True)

    train("keep1.0", ["--config.collider.keep_ratio=1.0"])
    baseline = os.path.join(args.out, "runs", "keep1.0")
    reference = early_reference(args.out, baseline, args.ref_step)
    for keep in keeps:
        train(f"keep{keep}_loss", [f"--config.collider.keep_ratio={keep}"])
        train(f"keep{keep}_excess", [f"--config.collider.keep_ratio={keep}",
                                     "--config.collider.score=excess_loss",
                                     f"--config.collider.reference={reference}"])

    print("fidelity: Collider's gradient vs the exact kept-token gradient ...", flush=True)
    # keep 1.0 is the exact gradient by construction: its column checks the measurement
    fidelity = layer_cosines(baseline, [(keep, t) for t in (args.seq_len, 4 * args.seq_len)
                                        for keep in (1.0, *keeps)])

    print("backward time: experiments.bench_collider at the training shape ...", flush=True)
    timing_path = os.path.join(args.out, "bench_collider.json")
    subprocess.run([sys.executable, "-m", "experiments.bench_collider",
                    "--keep=" + ",".join(str(k) for k in (1.0, *keeps)),
                    "--d_model=128", f"--n_layers={args.n_layers}", "--n_heads=4",
                    "--d_ff=384", f"--vocab={args.vocab}", f"--seq_len={args.seq_len}",
                    f"--batch={args.batch}", f"--rounds={args.rounds}", f"--out={timing_path}"],
                   check=True)
    with open(timing_path) as f:
        timing = json.load(f)["variants"]

    results = {"args": vars(args), "runs": runs, "fidelity": fidelity, "timing": timing}
    save_study(args.out, results, report(results))


def report(results: dict) -> str:
    args, runs, fidelity, timing = (results[k] for k in ("args", "runs", "fidelity", "timing"))
    base = runs["keep1.0"]
    lines = ["# Collider, honestly", "",
             f"`python -m experiments.collider_study --steps={args['steps']} "
             f"--seq_len={args['seq_len']}` (tiny ternary, AdamW 3e-3, rust-src 8k BPE, "
             f"{args['batch']} x {args['seq_len']} tokens a step). The excess-loss reference "
             f"is the keep-1.0 run's own checkpoint at step {args['ref_step']}.", "",
             "## Training", "",
             "| run | final val CE | vs keep 1.0 | step ms (median) | wall s |",
             "|---|---|---|---|---|"]
    tps = args["batch"] * args["seq_len"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['val_ce']:.3f} | {r['val_ce'] - base['val_ce']:+.3f} | "
                     f"{1e3 * tps / r['tokens_per_sec']:.0f} | {r['wall_s']:.0f} |")
    layers = list(next(iter(fidelity.values())))
    cols = list(fidelity)
    lines += ["", "## Fidelity: cosine(Collider's gradient, exact kept-token gradient)", "",
              "Per parameter group, on the keep-1.0 run's final weights, two validation "
              "batches; columns are keep ratio @ sequence length.", "",
              "| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f"{fidelity[c][layer]:.3f}" for c in cols)
                     + " |")
    lines += ["", "## Backward time (experiments.bench_collider, the training shape)", "",
              "| variant | forward ms | backward ms | backward / unfiltered |", "|---|---|---|---|"]
    for name, r in timing.items():
        lines.append(f"| {name} | {r['forward_ms']:.0f} | {r['backward_ms']:.0f} | "
                     f"{r['backward_ratio']:.3f} |")
    lowest = min(np.mean(list(v.values())) for k, v in fidelity.items()
                 if not k.startswith("1.0@"))
    lines += ["", f"Lowest mean layer cosine over the settings: {lowest:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
