"""The E3 benchmark: the E3 configurations and two AdamW baselines (dense, ternary) trained
one after another on the same data and token budget, with a report.

    python -m experiments.benchmark --quick                  # tiny model, ~12 min on 2 CPUs
    python -m experiments.benchmark --configs="e3:muon e3:muon_8bit e3:galore2 \\
        e3:galore2_muon_8bit e3:full" --model=125m --steps=2000 --out=runs/benchmark_125m

Each run is `python -m experiments.run` in its own process (so its peak host memory is its
own), with the same overrides: model preset, data (rust-src, one BPE), batch, sequence
length, steps, evaluation schedule and one measured matmul peak for MFU. Any further
`--config.GROUP.FIELD=VALUE` arguments are passed to every run. `DIR/results.json` holds the
raw numbers and the machine; `DIR/report.md` the table (ratios against the dense AdamW run),
the seed's claims next to what was measured, and three plots (`loss_vs_tokens.png`,
`loss_vs_wall.png`, `memory.png`).

    python -m experiments.benchmark --quick --sweep=lr [--lrs=0.5,1,2] [--seeds=3]

`--sweep=lr` first trains every arm at each multiple in `--lrs` of that arm's own
`optimizer.lr` (the Muon-family rate for the Muon/GaLore arms, the AdamW/Lion rate for the
others; the hybrids' AdamW-branch `adam_lr` stays fixed), keeps each arm's rate with the
lowest final validation CE, and reruns that rate with `training.seed` 1 .. `--seeds` - 1.
The table then shows each arm at its best rate, the report adds the grid (table and
`sweep_lr.png`) and the winners' mean +- std over seeds, and says for each arm whether its
CE is better or worse than dense AdamW's beyond one standard deviation of both, or within
noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments.benchmark import plan, report, runner
from experiments.configs.loading import load_config, split_configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=" ".join(plan.E3_CONFIGS),
                        help="experiment configs separated by spaces, each NAME[:VARIANT,...] "
                        "(\"e3:muon e3:full,seed\"); the baselines always run")
    parser.add_argument("--model", default=None, help="model preset (tiny with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 100 steps x 16 x 128 tokens: ~12 min on 2 CPU cores")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq_len", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None, help="BPE ids (8192 quick, 32768)")
    parser.add_argument("--max_bytes", type=int, default=0,
                        help="read at most this much of the corpus (0: all)")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per run")
    parser.add_argument("--eval_batches", type=int, default=4)
    parser.add_argument("--out", default=None, help="report directory (default "
                        "runs/benchmark_<model>)")
    parser.add_argument("--sweep", default="", choices=["", "lr"],
                        help="lr: each arm over --lrs x its own optimizer.lr, the best rerun "
                        "with --seeds seeds")
    parser.add_argument("--lrs", default="0.5,1,2",
                        help="with --sweep=lr: multiples of each arm's optimizer.lr")
    parser.add_argument("--seeds", type=int, default=3,
                        help="with --sweep=lr: seeds for each arm's best rate (>= 1)")
    parser.add_argument("--regenerate", action="store_true",
                        help="rewrite --out's report.md and plots from its results.json")
    args, extra = parser.parse_known_args(argv)
    if args.regenerate:
        if not args.out:
            parser.error("--regenerate needs --out=DIR (a finished benchmark)")
        return report.regenerate(args.out)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    quick = {"model": "tiny", "steps": 100, "batch": 16, "seq_len": 128, "vocab": 8192}
    full = {"model": "125m", "steps": 2000, "batch": 32, "seq_len": 1024, "vocab": 32768}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.configs = split_configs(args.configs)
    for config in args.configs:  # NAME, NAME:VARIANTS (e3:full,seed) or an old name (e3_muon)
        load_config(config)  # an unknown name or variant exits with the choices
    try:
        multiples = [float(m) for m in args.lrs.split(",") if m]
    except ValueError:
        parser.error(f"--lrs={args.lrs}: expected comma-separated numbers, e.g. 0.5,1,2")
    if args.sweep and (not multiples or min(multiples) <= 0 or args.seeds < 1):
        parser.error("--sweep=lr needs positive --lrs multiples and --seeds >= 1")
    out = args.out or os.path.join("runs", f"benchmark_{args.model}")
    if os.path.exists(os.path.join(out, "results.json")):
        raise SystemExit(f"error: {out} already holds a benchmark; choose another --out")
    os.makedirs(out, exist_ok=True)

    from nanochat_jax.train.metrics import measure_peak_flops

    args.peak = measure_peak_flops()
    runs = plan.runs(args, extra)
    count = iter(range(1, 10**6))

    def train(name: str, config: str, overrides: list[str]) -> dict:
        print(f"[{next(count)}] {name} (--config={config}) ...", flush=True)
        result = runner.run_one(name, config, overrides, out)
        print(f"    val CE {result['val_ce']:.3f}, {result['tokens_per_sec']:,.0f} tokens/s, "
              f"{result['wall_s']:.0f} s", flush=True)
        return result

    started = time.perf_counter()
    info = {"command": " ".join(["python -m experiments.benchmark",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "mode": "quick" if args.quick else "full", "model": args.model,
            "steps": args.steps, "evals": args.evals,
            "tokens_per_step": args.batch * args.seq_len,
            "vocab": args.vocab, "peak": args.peak, "machine": runner.machine(), "extra": extra}
    if args.sweep == "lr":
        results, info["sweep"] = runner.sweep(runs, multiples, args.seeds, train)
    else:
        results = [train(name, config, overrides) for name, config, overrides in runs]
    info["total_s"] = time.perf_counter() - started
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**info, "runs": results}, f, indent=1)
    report.write_report(results, info, out)


if __name__ == "__main__":
    main()
