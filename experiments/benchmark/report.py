"""The E3 benchmark's report: report.md (the table with ratios against dense AdamW, the seed's
claims next to what was measured, the sweep's grid and winners) and its plots, written from
the runs' summaries; `regenerate` rewrites them from a finished benchmark's results.json."""

from __future__ import annotations

import json
import os

import numpy as np

from experiments.benchmark.plan import BASELINE, is_e3
from experiments.benchmark.runner import from_disk, winner_record

CLAIMS = (
    ("2-3x faster training", "tokens/s against dense AdamW"),
    ("50-80% less memory", "parameter + optimizer-state bytes and peak memory against dense "
                           "AdamW"),
    ("15-20% data efficiency", "tokens to reach dense AdamW's final validation loss"),
    ("35% faster backprop", "Collider's filtered backward"),
)


def noise_verdict(mean: float, std: float, base_mean: float, base_std: float) -> str:
    """Lower CE is better; a difference counts only beyond one standard deviation of both."""
    if mean + std < base_mean - base_std:
        return "better"
    if mean - std > base_mean + base_std:
        return "worse"
    return "within noise"


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
    e3 = [r for r in results if is_e3(r["config"])]
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


def markdown(results: list[dict], info: dict) -> str:
    """report.md's text: the table, the claims, the plots."""
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
    e3 = [r for r in results if is_e3(r["config"])]
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


def write_report(results: list[dict], info: dict, out: str) -> None:
    """report.md and the plots in `out` from the runs' summaries and the run's info."""
    plots(results, info["tokens_per_step"], out)
    if info.get("sweep"):
        sweep_plot(info["sweep"], out)
    text = markdown(results, info)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}/report.md and the plots")


def save_study(out: str, results: dict, text: str) -> None:
    """A study's `out`/results.json and `out`/report.md; the report printed."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)


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
            runs = [{**first, "name": seed0}] + [from_disk(out, n) for n in names[1:]]
            w.update(winner_record(w["lr"], runs))
            rebuilt = True
    if rebuilt:  # keep them: results.json alone then regenerates the report
        with open(path, "w") as f:
            json.dump({**info, "runs": results}, f, indent=1)
    write_report(results, info, out)
