"""The E3 benchmark: the E3 configurations and two AdamW baselines (dense, ternary) trained
one after another on the same data and token budget, with a report.

    python -m experiments.benchmark --quick                  # tiny model, ~12 min on 2 CPUs
    python -m experiments.benchmark --configs=e3:muon,e3:muon_8bit,e3:galore2,\\
        e3:galore2_muon_8bit,e3:full --model=125m --steps=2000 --out=runs/benchmark_125m

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
import platform
import subprocess
import sys
import time

import numpy as np

from experiments.configs import variant_names
from experiments.run import canonical, load_config, run_name, split_configs

# run names (experiments.run.run_name) e3_muon, ..., e3_full
E3_CONFIGS = ("e3:muon", "e3:muon_8bit", "e3:galore2", "e3:galore2_muon_8bit", "e3:full")
BASELINE = "adamw_dense"
# name -> (experiment config, overrides): the two AdamW references
BASELINES = {BASELINE: ("base", ["--config.model.ternary=False"]),
             "adamw_ternary": ("base", [])}
# The tiny model's rates (the E3 configs' defaults are for 125m): what e3_full sets
TINY_RATES = ["--config.optimizer.adam_lr=3e-3", "--config.optimizer.galore.rank=32",
              "--config.optimizer.galore.update_every=50"]
# Arms whose own rate is set for 125m against AdamW's 1.5e-3: rescaled to tiny's AdamW 3e-3
# by run name; Lion: AdamW's / 5, as e3:lion
TINY_ARM_RATES = {"e3_lion": ["--config.optimizer.lr=6e-4"]}
CLAIMS = (
    ("2-3x faster training", "tokens/s against dense AdamW"),
    ("50-80% less memory", "parameter + optimizer-state bytes and peak memory against dense "
                           "AdamW"),
    ("15-20% data efficiency", "tokens to reach dense AdamW's final validation loss"),
    ("35% faster backprop", "Collider's filtered backward"),
)


def _is_e3(config: str) -> bool:
    """Whether a run's config is one of the seed's E3 arms (`E3_CONFIGS`, any variant of
    them, in new or old spelling); Lion and the AdamW references are not."""
    family, _, variants = canonical(config).partition(":")
    arms = {canonical(c).partition(":")[2] for c in E3_CONFIGS}
    return family == "e3" and bool(set(variant_names(variants)) & arms)


def plan(args, extra: list[str]) -> list[tuple[str, str, list[str]]]:
    """(run name, experiment config, overrides) for every run, the dense baseline first."""
    steps = args.steps
    common = [f"--config.model.preset={args.model}", f"--config.training.steps={steps}",
              f"--config.model.seq_len={args.seq_len}", f"--config.data.batch_size={args.batch}",
              "--config.data.source=rust-src", f"--config.data.max_bytes={args.max_bytes}",
              f"--config.data.vocab_size={args.vocab}", f"--config.model.vocab_size={args.vocab}",
              f"--config.training.eval_every={max(1, steps // args.evals)}",
              f"--config.training.log_every={max(1, min(10, steps // 10))}",
              f"--config.training.eval_batches={args.eval_batches}",
              f"--config.optimizer.warmup_steps={max(1, steps // 10)}",
              f"--config.checkpoint.every={steps}", f"--config.training.peak_flops={args.peak:.6g}"]
    if args.model == "tiny":
        common += TINY_RATES
        baseline_lr = ["--config.optimizer.lr=3e-3"]  # tiny's AdamW rate
    else:
        baseline_lr = []
    runs = [(name, cfg, over + baseline_lr) for name, (cfg, over) in BASELINES.items()]
    runs += [(run_name(config), config,
              TINY_ARM_RATES.get(run_name(config), []) if args.model == "tiny" else [])
             for config in args.configs]
    return [(name, cfg, common + over + extra) for name, cfg, over in runs]


LR_FLAG = "--config.optimizer.lr="
SEED_FLAG = "--config.training.seed="


LOOP_FLAG = "--config.loop.enabled="


def _last_override(overrides: list[str], flag: str) -> str | None:
    return next((item[len(flag):] for item in reversed(overrides) if item.startswith(flag)),
                None)


def centre_lr(config: str, overrides: list[str]) -> float:
    """The arm's own `optimizer.lr`: the last override of it, else its config's value."""
    lr = _last_override(overrides, LR_FLAG)
    if lr is not None:
        return float(lr)
    return float(load_config(config).optimizer.lr)


def is_looped(config: str, overrides: list[str]) -> bool:
    """Whether the arm runs LoopLM (`loop.enabled`), from its overrides or its config."""
    enabled = _last_override(overrides, LOOP_FLAG)
    if enabled is None:
        return bool(load_config(config).loop.enabled)
    return enabled.lower() in ("true", "1")


def arm_multiples(config: str, overrides: list[str], multiples: list[float]) -> list[float]:
    """The multiples of the arm's rate it is swept over: `multiples`, and for a looped arm
    (LoopLM) one more below the smallest (half of it): Ouro trains looped models at smaller
    rates than plain ones, so the grid reaches lower there."""
    if is_looped(config, overrides):
        return sorted({min(multiples) / 2, *multiples})
    return sorted(multiples)


def lr_grid(runs: list[tuple[str, str, list[str]]], multiples: list[float]
            ) -> list[tuple[str, str, list[str], str, float, float]]:
    """(run name, config, overrides, arm, multiple, lr) for every arm at every multiple of its
    own rate (`arm_multiples`)."""
    grid = []
    for arm, config, overrides in runs:
        centre = centre_lr(config, overrides)
        for m in arm_multiples(config, overrides, multiples):
            lr = float(f"{centre * m:.4g}")
            grid.append((f"{arm}_lr{lr:g}", config, [*overrides, f"{LR_FLAG}{lr:g}"], arm, m,
                         lr))
    return grid


def noise_verdict(mean: float, std: float, base_mean: float, base_std: float) -> str:
    """Lower CE is better; a difference counts only beyond one standard deviation of both."""
    if mean + std < base_mean - base_std:
        return "better"
    if mean - std > base_mean + base_std:
        return "worse"
    return "within noise"


def run_one(name: str, config: str, overrides: list[str], out: str) -> dict:
    """Train one run in a child process; its summary with wall time and peak host RSS."""
    workdir = os.path.join(out, "runs", name)
    log_path = os.path.join(out, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [sys.executable, "-m", "experiments.run", f"--config={config}",
           f"--workdir={workdir}", *overrides]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"error: run {name} failed (log {log_path}):\n{tail}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return summarise(name, config, rows, wall, usage.ru_maxrss * 1024, " ".join(cmd[1:]))


def summarise(name: str, config: str, rows: list[dict], wall: float, peak_rss: int,
              command: str) -> dict:
    """Per-run numbers from its metrics.jsonl rows."""
    logs = [r for r in rows if "throughput/tokens_per_sec" in r]
    evals = [r for r in rows if "eval/ce" in r]
    tps = np.array([r["throughput/tokens_per_sec"] for r in logs])
    memory = rows[0]
    final = evals[-1]
    device_peak = max((r.get("memory/peak_device_bytes", 0) for r in rows), default=0)
    return {
        "name": name, "config": config, "command": command, "wall_s": wall,
        "tokens_per_sec": float(np.median(tps)) if len(tps) else None,
        "tokens_per_sec_p10_p90": [float(np.percentile(tps, 10)), float(np.percentile(tps, 90))]
        if len(tps) else None,
        "mfu": float(np.median([r["throughput/mfu"] for r in logs])) if logs else None,
        "params_bytes": memory.get("memory/params_bytes"),
        "opt_state_bytes": memory.get("memory/opt_state_bytes"),
        "peak_host_bytes": peak_rss, "peak_device_bytes": device_peak or None,
        "final_step": final["step"], "val_ce": final["eval/ce"], "val_bpb": final["eval/bpb"],
        "evals": [{"step": r["step"], "ce": r["eval/ce"], "bpb": r["eval/bpb"],
                   "wall_s": r.get("training/wall_s")} for r in evals],
        "train_loss": [[r["step"], r["loss/total"]] for r in rows if "loss/total" in r],
        "loop": loop_use(logs),
    }


def loop_use(logs: list[dict]) -> dict | None:
    """Whether a LoopLM run uses its loops, from its last logged training step: the CE after
    each loop (`loop/ce/stepN`), their spread (first minus last: what the extra loops buy) and
    the exit distribution's mean step and entropy. None for a run without loops."""
    last = next((r for r in reversed(logs) if "loop/ce/step1" in r), None)
    if last is None:
        return None
    ce = [last[f"loop/ce/step{i}"] for i in range(1, 100) if f"loop/ce/step{i}" in last]
    return {"step": last["step"], "ce_per_loop": ce, "spread": ce[0] - ce[-1],
            "mean_exit_step": last["loop/mean_exit_step"],
            "exit_entropy": last["loop/exit_entropy"]}


def step_times(result: dict, tokens_per_step: int) -> dict:
    """Step time (ms) from the logged tokens/s: median and the 10th-90th percentile."""
    tps, (lo, hi) = result["tokens_per_sec"], result["tokens_per_sec_p10_p90"]
    return {"median": 1e3 * tokens_per_step / tps, "p10": 1e3 * tokens_per_step / hi,
            "p90": 1e3 * tokens_per_step / lo}


def time_to_target(result: dict, target: float, tokens_per_step: int):
    """(tokens, wall seconds) at the first evaluation with CE <= target, or None."""
    for e in result["evals"]:
        if e["ce"] <= target:
            return e["step"] * tokens_per_step, e["wall_s"]
    return None


def machine() -> dict:
    import jax

    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def plots(results: list[dict], tokens_per_step: int, out: str) -> list[str]:
    """loss_vs_tokens.png, loss_vs_wall.png, memory.png in `out`."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("error: the report's plots need matplotlib (a dependency of "
                         "nanochat-jax): pip install -e .") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for key, xlabel, fname in (("tokens", "training tokens", "loss_vs_tokens.png"),
                               ("wall", "wall time (s, start-up included)",
                                "loss_vs_wall.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            xs = [e["step"] * tokens_per_step if key == "tokens" else e["wall_s"]
                  for e in r["evals"]]
            ax.plot(xs, [e["ce"] for e in r["evals"]], marker="o", ms=3, label=r["name"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation CE (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)
        plt.close(fig)
        names.append(fname)
    # state bytes (left) and process peaks (right): at small sizes the runtime dominates RSS
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    x, mib = np.arange(len(results)), lambda v: (v or 0) / 2**20
    for ax, bars in ((left, (("params_bytes", "parameters"), ("opt_state_bytes",
                                                               "optimizer state"))),
                     (right, (("peak_host_bytes", "peak host RSS"),
                              ("peak_device_bytes", "peak device memory")))):
        width = 0.8 / len(bars)
        for i, (key, label) in enumerate(bars):
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, [mib(r[key]) for r in results],
                   width, label=label)
        ax.set_xticks(x, [r["name"] for r in results], rotation=25, fontsize=8)
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "memory.png"), dpi=120)
    plt.close(fig)
    return names + ["memory.png"]


def sweep_section(results: list[dict], info: dict) -> list[str]:
    """The learning-rate grid and the winners over seeds, with noise-aware verdicts."""
    sweep = info["sweep"]
    columns = sorted({p["multiple"] for points in sweep["grid"].values() for p in points})
    lines = ["", "## Learning-rate sweep", "",
             f"Each arm at {', '.join(f'{m:g}' for m in sweep['multiples'])} x its own "
             f"`optimizer.lr`; final validation CE (the best per arm in bold). Then the best "
             f"rate again with seeds 1..{sweep['seeds'] - 1}: mean +- std over "
             f"{sweep['seeds']} seeds. Looped arms (LoopLM) also run at half the smallest "
             f"multiple: Ouro trains looped models at smaller rates.", "",
             "| arm | " + " | ".join(f"x{m:g}" for m in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for arm, points in sweep["grid"].items():
        best = min(points, key=lambda p: p["val_ce"])
        by_multiple = {p["multiple"]: p for p in points}
        cells = ["-" if m not in by_multiple else
                 f"**{by_multiple[m]['lr']:g}: {by_multiple[m]['val_ce']:.3f}**"
                 if by_multiple[m] is best else
                 f"{by_multiple[m]['lr']:g}: {by_multiple[m]['val_ce']:.3f}" for m in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    edge = [arm for arm, points in sweep["grid"].items() if len(points) > 1 and min(
        points, key=lambda p: p["val_ce"])["multiple"] in (columns[0], columns[-1])]
    if edge:
        lines += ["", f"At the edge of its grid: {', '.join(edge)} (the best rate is the "
                  f"smallest or largest tried, so the optimum may lie beyond; rerun with a "
                  f"wider `--lrs`)."]
    base = sweep["winners"][BASELINE]
    lines += ["", "![validation CE vs learning rate](sweep_lr.png)", "",
              f"| arm | best lr | val CE mean +- std ({sweep['seeds']} seeds) | vs dense AdamW |",
              "|---|---|---|---|"]
    for arm, w in sweep["winners"].items():
        verdict = ("-" if arm == BASELINE else
                   noise_verdict(w["mean"], w["std"], base["mean"], base["std"]))
        lines.append(f"| {arm} | {w['lr']:g} | {w['mean']:.3f} +- {w['std']:.3f} | {verdict} |")
    return lines


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def time_to_dense(info: dict) -> dict[str, dict]:
    """Per tuned arm, over its seeds: wall seconds and tokens to reach the tuned dense AdamW
    arm's mean final validation CE (the first evaluation at or below it), the speed-up
    against dense AdamW's own time to its final loss (its whole run: last evaluation's wall
    time), and how many seeds got there."""
    sweep, tps = info["sweep"], info["tokens_per_step"]
    base = sweep["winners"][BASELINE]
    target = base["mean"]
    dense_s = _mean_std([r["evals"][-1]["wall_s"] for r in base["runs"]])[0]
    dense_tokens = base["runs"][0]["evals"][-1]["step"] * tps
    out = {}
    for arm, w in sweep["winners"].items():
        reached = [x for x in (time_to_target(r, target, tps) for r in w["runs"]) if x]
        row = {"target": target, "reached": len(reached), "seeds": len(w["runs"]),
               "dense_s": dense_s, "dense_tokens": dense_tokens}
        if reached:
            row["seconds"] = _mean_std([sec for _, sec in reached])
            row["tokens"] = _mean_std([tok for tok, _ in reached])
            row["speedup"] = _mean_std([dense_s / sec for _, sec in reached])
            row["token_ratio"] = _mean_std([tok / dense_tokens for tok, _ in reached])
        out[arm] = row
    return out


def headline_section(info: dict) -> list[str]:
    """The headline: time (and tokens) to the tuned dense AdamW loss, with error bars."""
    reach = time_to_dense(info)
    base = reach[BASELINE]
    seeds = base["seeds"]
    lines = ["## Headline: time to dense AdamW's loss", "",
             f"Each arm at its best learning rate, {seeds} seeds. Target: the tuned dense "
             f"AdamW arm's mean final validation CE, {base['target']:.3f}. Time is wall "
             f"seconds since the run's process started (compilation included) at the first "
             f"evaluation at or below the target ({info['evals']} evaluations per run, so "
             f"times and tokens move in steps of 1/{info['evals']} of the run); dense AdamW's "
             f"own time is its whole run, {base['dense_s']:.0f} s for "
             f"{base['dense_tokens']:,} tokens. Mean +- std over the seeds that reached it.",
             "", "| arm | seeds reaching | seconds | tokens | speed-up vs dense AdamW | "
             "tokens vs dense AdamW |", "|---|---|---|---|---|---|"]

    def fmt(ms, spec):
        return f"{ms[0]:{spec}} +- {ms[1]:{spec}}"

    for arm, r in reach.items():
        if not r["reached"]:
            lines.append(f"| {arm} | 0/{r['seeds']} | not reached | - | - | - |")
            continue
        lines.append(f"| {arm} | {r['reached']}/{r['seeds']} | {fmt(r['seconds'], '.0f')} | "
                     f"{fmt(r['tokens'], ',.0f')} | {fmt(r['speedup'], '.2f')}x | "
                     f"{fmt(r['token_ratio'], '.2f')} |")
    return lines + [""]


def claim_verdicts(results: list[dict], info: dict) -> list[str]:
    """The seed's claims, each with what this run measured and one sentence: held or not,
    judged on the error bars."""
    reach = time_to_dense(info)
    base = next(r for r in results if r["name"] == BASELINE)
    e3 = [r for r in results if _is_e3(r["config"])]
    lines = ["", "## The seed's claims, judged", "", "| claim | measured here | verdict |",
             "|---|---|---|"]
    fast = {r["name"]: reach[r["name"]] for r in e3 if reach[r["name"]]["reached"]}
    best = max(fast, key=lambda a: fast[a]["speedup"][0], default=None)
    speed = ", ".join(f"{a} {fast[a]['speedup'][0]:.2f}+-{fast[a]['speedup'][1]:.2f}x"
                      for a in fast) or "no E3 arm reached the target"
    if best is None:
        verdict = "Did not hold: no E3 arm reached dense AdamW's loss."
    else:
        lo = fast[best]["speedup"][0] - fast[best]["speedup"][1]
        verdict = (f"Held: {best} is at least 2x faster to dense AdamW's loss beyond one std."
                   if lo >= 2 else
                   f"Did not hold: the fastest arm, {best}, is {fast[best]['speedup'][0]:.2f}x"
                   + (" (faster than dense AdamW beyond one std, but short of 2x)." if lo > 1
                      else " (within noise of dense AdamW or slower)."))
    lines.append(f"| 2-3x faster training | wall time to dense AdamW's loss, speed-up: {speed} "
                 f"| {verdict} |")

    def state(r):
        return (r["params_bytes"] or 0) + (r["opt_state_bytes"] or 0)

    saved = {r["name"]: 1 - state(r) / state(base) for r in e3}
    top = max(saved, key=saved.get, default=None)
    lines.append(
        f"| 50-80% less memory | parameters + optimizer state saved against dense AdamW at "
        f"the `{info['model']}` preset: {', '.join(f'{a} {v:+.0%}' for a, v in saved.items())} "
        f"| " + (f"Held at this size: {top} saves {saved[top]:.0%}." if top and saved[top] >= 0.5
                 else f"Did not hold at this size: at most {saved[top]:.0%} ({top}); the "
                 f"embedding and head (AdamW in every arm) dominate a model this small." if top
                 else "No E3 arm.") + " |")
    ratios = {a: r["token_ratio"] for a, r in fast.items()}
    good = [a for a, (m, sd) in ratios.items() if m + sd <= 0.85]
    lines.append(
        f"| 15-20% data efficiency | tokens to dense AdamW's loss relative to dense AdamW's "
        f"budget: {', '.join(f'{a} {m:.2f}+-{sd:.2f}' for a, (m, sd) in ratios.items()) or '-'}"
        f" | " + (f"Held: {', '.join(good)} need(s) at least 15% fewer tokens beyond one std."
                  if good else "Did not hold beyond one std (or no arm reached the loss).")
        + " |")
    opt = {r["name"]: 1 - (r["opt_state_bytes"] or 0) / (base["opt_state_bytes"] or 1)
           for r in results if r["name"] in ("e3_muon_8bit", "e3_galore2",
                                             "e3_galore2_muon_8bit")}
    claims = {"e3_muon_8bit": (0.86, "86%"), "e3_galore2": (0.50, "50-65%")}
    held = [f"{a} {opt[a]:.0%} vs the seed's {text}" for a, (bar, text) in claims.items()
            if a in opt]
    lines.append(
        f"| 8-bit Muon 86%, GaLore 2 50-65% less optimizer memory | optimizer-state bytes "
        f"saved against dense AdamW's: {', '.join(f'{a} {v:+.0%}' for a, v in opt.items())} | "
        + ("Held: " if all(opt[a] >= bar for a, (bar, _) in claims.items() if a in opt)
           and held else "Did not hold at this size: ") + "; ".join(held)
        + ". The embedding and head keep AdamW moments in every arm; their share shrinks "
          "with model size. |")
    lines.append("| 35% faster backprop | not separated here: `e3_full` includes Collider's "
                 "filtered backward among its other features; `python -m "
                 "experiments.bench_collider` times the backward alone | Not judged by this "
                 "report. |")
    return lines


def loop_section(results: list[dict]) -> list[str]:
    """For each LoopLM run: validation CE, the training CE after each loop and the exit
    distribution at its last logged step. Loops that are used lower the CE from one to the
    next and pull the mean exit step off 1."""
    looped = [r for r in results if r.get("loop")]
    if not looped:
        return []
    lines = ["", "## LoopLM: are the extra loops used?", "",
             "Training CE after each loop at the last logged step (the exit gate's expected "
             "loss is what trains), the spread first loop - last loop, and the exit "
             "distribution's mean step and entropy (nats).", "",
             "| run | lr | val CE | CE per loop | spread | mean exit step | exit entropy |",
             "|---|---|---|---|---|---|---|"]
    for r in looped:
        use = r["loop"]
        lr = f"{r['lr']:g}" if "lr" in r else "-"
        lines.append(f"| {r['name']} | {lr} | {r['val_ce']:.3f} | "
                     f"{' / '.join(f'{c:.3f}' for c in use['ce_per_loop'])} | "
                     f"{use['spread']:+.3f} | {use['mean_exit_step']:.2f} of "
                     f"{len(use['ce_per_loop'])} | {use['exit_entropy']:.2f} |")
    return lines


def sweep_plot(sweep: dict, out: str) -> str:
    """sweep_lr.png: final validation CE against the learning rate, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, points in sweep["grid"].items():
        ax.plot([p["lr"] for p in points], [p["val_ce"] for p in points], marker="o", ms=4,
                label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer.lr")
    ax.set_ylabel("final validation CE (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep_lr.png"), dpi=120)
    plt.close(fig)
    return "sweep_lr.png"


def report(results: list[dict], info: dict, out: str) -> str:
    """report.md: the table, the claims, the plots."""
    tps_step = info["tokens_per_step"]
    base = next(r for r in results if r["name"] == BASELINE)
    target = base["val_ce"]

    def mib(v):
        return "n/a" if v is None else f"{v / 2**20:,.1f}"

    def ratio(a, b):
        return "n/a" if a is None or not b else f"{a / b:.2f}"

    lines = [f"# E3 benchmark ({info['mode']})", ""]
    if info.get("command"):
        lines += [f"`{info['command']}`" + (f" ({info['total_s'] / 60:.0f} min)"
                                            if info.get("total_s") else ""), ""]
    lines += [f"Machine: {info['machine']['device_count']} x {info['machine']['device_kind']} "
             f"({info['machine']['backend']}), {info['machine']['cpu_count']} CPU cores, JAX "
             f"{info['machine']['jax']}. Model `{info['model']}`, {info['steps']} steps x "
             f"{tps_step:,} tokens ({info['steps'] * tps_step:,} tokens per run), rust-src "
             f"{info['vocab']}-id BPE, matmul peak {info['peak'] / 1e9:.1f} GFLOP/s "
             f"(measured). Ratios are against `{BASELINE}` in this run; step time is the "
             f"median over log intervals (10th-90th percentile in brackets).", ""]
    if info.get("sweep"):
        lines += headline_section(info) + [
            "## Every arm at its best rate (seed 0)", ""]
    lines += ["| run | val CE | val bpb | tokens/s | vs dense | step ms | MFU | params MiB | "
             "opt state MiB | state vs dense | peak host MiB | peak device MiB | to target: "
             "tokens, s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = step_times(r, tps_step)
        reached = time_to_target(r, target, tps_step)
        state = (r["params_bytes"] or 0) + (r["opt_state_bytes"] or 0)
        base_state = (base["params_bytes"] or 0) + (base["opt_state_bytes"] or 0)
        lines.append(
            f"| {r['name']} | {r['val_ce']:.3f} | {r['val_bpb']:.3f} | "
            f"{r['tokens_per_sec']:,.0f} | {ratio(r['tokens_per_sec'], base['tokens_per_sec'])}"
            f" | {st['median']:.0f} ({st['p10']:.0f}-{st['p90']:.0f}) | {r['mfu']:.3f} | "
            f"{mib(r['params_bytes'])} | {mib(r['opt_state_bytes'])} | "
            f"{ratio(state, base_state)} | {mib(r['peak_host_bytes'])} | "
            f"{mib(r['peak_device_bytes'])} | "
            f"{'not reached' if reached is None else f'{reached[0]:,}, {reached[1]:.0f}'} | "
            f"{r['wall_s']:.0f} |")
    lines += ["", f"Target loss: `{BASELINE}`'s final validation CE, {target:.3f}; \"to "
              f"target\" is the first evaluation at or below it (tokens, and seconds since the "
              f"run's process started, compilation included)."]
    if info.get("sweep"):
        lines += claim_verdicts(results, info)
        lines += sweep_section(results, info)
    e3 = [r for r in results if _is_e3(r["config"])]
    fastest = max(e3, key=lambda r: r["tokens_per_sec"], default=None)
    if fastest and not info.get("sweep"):
        lines += ["", "## The seed's claims next to this run", "", "| claim | measured here |",
                  "|---|---|"]
        speed = ", ".join(f"{r['name']} {r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x"
                          for r in e3)

        def state(r):
            return (r["params_bytes"] or 0) + (r["opt_state_bytes"] or 0)

        memory = ", ".join(f"{r['name']} {1 - state(r) / state(base):+.0%}" for r in e3)
        rss = ", ".join(f"{r['name']} {1 - r['peak_host_bytes'] / base['peak_host_bytes']:+.0%}"
                        for r in e3)
        tokens = []
        for r in e3:
            reached = time_to_target(r, target, tps_step)
            base_reached = time_to_target(base, target, tps_step)
            tokens.append(f"{r['name']} not reached" if reached is None else
                          f"{r['name']} {reached[0] / base_reached[0]:.2f}x")
        filtered = [r["name"] for r in e3 if r["name"] == "e3_full"]
        lines += [
            f"| 2-3x faster training | tokens/s vs dense AdamW: {speed} |",
            f"| 50-80% less memory | parameter + optimizer-state memory saved against dense "
            f"AdamW (negative: more): {memory}; peak host RSS saved: {rss} |",
            f"| 15-20% data efficiency | tokens to reach dense AdamW's final loss, relative to "
            f"dense AdamW (< 1 is better): {', '.join(tokens)} |",
            "| 35% faster backprop | not separated by this benchmark: "
            + (f"{', '.join(filtered)} includes Collider's filtered backward (keep 0.7) among "
               "its other features; `python -m experiments.bench_collider` times the backward "
               "alone |" if filtered else "no Collider run here |")]
    lines += loop_section(results)
    lines += ["", "![validation loss vs tokens](loss_vs_tokens.png)", "",
              "![validation loss vs wall time](loss_vs_wall.png)", "",
              "![memory](memory.png)", "", "Commands (each run's log is in `logs/`):", ""]
    lines += [f"- {r['name']}: `python {r['command']}`" for r in results]
    return "\n".join(lines) + "\n"


def _sweep(runs, multiples: list[float], seeds: int, train):
    """Grid, winners, seeds. -> (each arm's best-rate seed-0 run, the sweep's record)."""
    grid: dict[str, list[dict]] = {}
    best: dict[str, tuple[dict, list[str], str]] = {}
    for name, config, overrides, arm, multiple, lr in lr_grid(runs, multiples):
        r = train(name, config, overrides)
        grid.setdefault(arm, []).append({"multiple": multiple, "lr": lr, "val_ce": r["val_ce"],
                                         "run": name, "loop": r["loop"]})
        if arm not in best or r["val_ce"] < best[arm][0]["val_ce"]:
            best[arm] = (r, overrides, config)
    winners, results = {}, []
    for arm, (r, overrides, config) in best.items():
        runs = [r] + [train(f"{r['name']}_seed{s}", config, [*overrides, f"{SEED_FLAG}{s}"])
                      for s in range(1, seeds)]
        lr = next(p["lr"] for p in grid[arm] if p["run"] == r["name"])
        winners[arm] = winner_record(lr, runs)
        results.append({**r, "name": arm, "lr": lr})
    return results, {"multiples": multiples, "seeds": seeds, "grid": grid, "winners": winners}


def winner_record(lr: float, runs: list[dict]) -> dict:
    """An arm's best rate over its seeds: final CEs with mean and std, and each seed's
    evaluation curve and wall time (for time to target)."""
    ces = [r["val_ce"] for r in runs]
    return {"lr": lr, "val_ce": ces, "mean": float(np.mean(ces)),
            "std": float(np.std(ces, ddof=1)) if len(ces) > 1 else 0.0,
            "runs": [{"name": r["name"], "val_ce": r["val_ce"], "wall_s": r["wall_s"],
                      "evals": r["evals"], "tokens_per_sec": r["tokens_per_sec"]}
                     for r in runs]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(E3_CONFIGS),
                        help="comma-separated experiment configs (the baselines always run)")
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
        return regenerate(args.out)
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
    runs = plan(args, extra)
    count = iter(range(1, 10**6))

    def train(name: str, config: str, overrides: list[str]) -> dict:
        print(f"[{next(count)}] {name} (--config={config}) ...", flush=True)
        r = run_one(name, config, overrides, out)
        print(f"    val CE {r['val_ce']:.3f}, {r['tokens_per_sec']:,.0f} tokens/s, "
              f"{r['wall_s']:.0f} s", flush=True)
        return r

    started = time.perf_counter()
    info = {"command": " ".join(["python -m experiments.benchmark",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "mode": "quick" if args.quick else "full", "model": args.model,
            "steps": args.steps, "evals": args.evals,
            "tokens_per_step": args.batch * args.seq_len,
            "vocab": args.vocab, "peak": args.peak, "machine": machine(), "extra": extra}
    if args.sweep == "lr":
        results, info["sweep"] = _sweep(runs, multiples, args.seeds, train)
    else:
        results = [train(name, config, overrides) for name, config, overrides in runs]
    info["total_s"] = time.perf_counter() - started
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**info, "runs": results}, f, indent=1)
    write_report(results, info, out)


def save_study(out: str, results: dict, text: str) -> None:
    """A study's `out`/results.json and `out`/report.md; the report printed."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)


def write_report(results: list[dict], info: dict, out: str) -> None:
    """report.md and the plots in `out` from the runs' summaries and the run's info."""
    plots(results, info["tokens_per_step"], out)
    if info.get("sweep"):
        sweep_plot(info["sweep"], out)
    text = report(results, info, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}/report.md and the plots")


def regenerate(out: str) -> None:
    """Rewrite report.md and the plots of a finished benchmark from its results.json (and,
    for a sweep recorded before seeds' curves were kept, from its runs' metrics.jsonl)."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist: nothing to regenerate")
    with open(path) as f:
        info = json.load(f)
    results = info.pop("runs")
    info.setdefault("evals", 8)
    rebuilt = False
    for arm, w in (info.get("sweep") or {}).get("winners", {}).items():
        if "runs" not in w:  # rebuild each seed's curve from its run directory
            first = next(r for r in results if r["name"] == arm)
            seed0 = next(p["run"] for p in info["sweep"]["grid"][arm] if p["lr"] == w["lr"])
            names = [seed0] + [f"{seed0}_seed{s}" for s in range(1, len(w["val_ce"]))]
            runs = [{**first, "name": seed0}] + [_from_disk(out, n) for n in names[1:]]
            w.update(winner_record(w["lr"], runs))
            rebuilt = True
    if rebuilt:  # keep them: results.json alone then regenerates the report
        with open(path, "w") as f:
            json.dump({**info, "runs": results}, f, indent=1)
    write_report(results, info, out)


def _from_disk(out: str, name: str) -> dict:
    """A run's summary from its metrics.jsonl alone (wall time: its last evaluation's)."""
    with open(os.path.join(out, "runs", name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    wall = max(r.get("training/wall_s") or 0 for r in rows)
    return summarise(name, "", rows, wall, 0, "")


if __name__ == "__main__":
    main()
