"""Memory where it means something: each E3 arm's parameter and optimizer-state bytes at sizes
where the hidden matrices dominate, and a measured training step's peak host RSS.

    python -m experiments.memory_at_size [--presets=350m,1b,7b] [--measure=350m]
        [--compile=350m@cpu,1b@v5e:2x2,7b@v5p:2x2x1] [--seq_len=256 --out=DIR] [--update]

1. State bytes (exact, seconds): `jax.eval_shape` of the model and optimizer init of every
   arm's config at each preset (`nanochat_jax.optim.memory.state_memory`): parameters,
   optimizer state, and the saving against dense AdamW, next to the seed's "8-bit Muon 86%",
   "GaLore 2 50-65%" and "50-80% less memory". On a mesh with fsdp=N each device holds 1/N.
2. Measured (minutes): each arm trains 2 steps at the `--measure` preset (batch 1 x
   `--seq_len`, one evaluation batch), each run its own process, and its peak host RSS
   (`ru_maxrss` of the child) is recorded: parameters, gradients, optimizer state,
   activations and the runtime together.
3. Compiled (minutes per arm): each arm's real train step compiled in its own process by
   `python -m experiments.compile` for PRESET@TOPOLOGY: on a TPU topology (needs libtpu, no
   TPU) the base run's batch 32 x 1024 in bf16 with full remat and scanned blocks
   (`model.scan_layers`: compile time independent of depth) over fsdp = all chips, per
   device; on `cpu` the measured runs' batch and sequence, for this host. Arguments
   (parameters + optimizer state + batch), temporaries (gradients, activations, the
   optimizer's update intermediates) and the total, from XLA's memory analysis.

Writes DIR/report.md and DIR/results.json (default docs/benchmarks/memory); `--update` adds
the sections asked for to an existing report and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from experiments.benchmark.plan import BASELINE
from experiments.benchmark.report import save_study
from experiments.benchmark.runner import run_one
from experiments.configs.loading import load_config
from nanochat_jax.optim.memory import state_memory
from nanochat_jax.train.setup import abstract_train_state

# arm -> (config, overrides): the optimizer arms and both AdamW references, as in the
# benchmark. Not e3_full: its optimizer is e3_galore2_muon_8bit's, and its config carries the
# tiny model's GaLore rank (32) and 8k vocabulary, which mean nothing at these sizes.
TERNARY_BASELINE = "adamw_ternary"  # the ternary arms' own reference: only the optimizer differs
ARMS = {BASELINE: ("base", ["--config.model.ternary=False"]), TERNARY_BASELINE: ("base", []),
        "e3_muon": ("e3_muon", []), "e3_muon_8bit": ("e3_muon_8bit", []),
        "e3_galore2": ("e3_galore2", []), "e3_galore2_muon_8bit": ("e3_galore2_muon_8bit", []),
        "e3_lion": ("e3_lion", [])}
SEED_CLAIMS = {"e3_muon_8bit": "86% less optimizer memory (8-bit Muon)",
               "e3_galore2": "50-65% less optimizer memory (GaLore 2)",
               "e3_galore2_muon_8bit": "50-80% less memory (E3)"}


def _config(arm: str, preset: str):
    name, overrides = ARMS[arm]
    config = load_config(name)
    config.model.preset = preset
    config.model.ternary = "--config.model.ternary=False" not in overrides
    config.model.vocab_size = max(config.model.vocab_size, config.data.vocab_size)
    return config


def state_table(presets: list[str], arms: list[str]) -> dict[str, dict[str, dict]]:
    """preset -> arm -> state_memory (bytes of params and optimizer state)."""
    out = {}
    for preset in presets:
        out[preset] = {}
        for arm in arms:
            state = abstract_train_state(_config(arm, preset))
            m = state_memory(state.params, state.opt_state)
            out[preset][arm] = {k: m[k] for k in ("params", "params_bytes", "opt_state_bytes",
                                                  "groups")}
            print(f"{preset} {arm}: optimizer state {m['opt_state_bytes'] / 2**30:.2f} GiB",
                  flush=True)
    return out


def measure(preset: str, seq_len: int, out: str, arms: list[str], vocab: int = 8192,
            max_bytes: int = 4_000_000) -> dict[str, dict]:
    """arm -> the summary of 2 training steps at `preset` in its own process (peak RSS)."""
    common = [f"--config.model.preset={preset}", "--config.training.steps=2",
              f"--config.model.seq_len={seq_len}", "--config.data.batch_size=1",
              "--config.data.source=rust-src", f"--config.data.vocab_size={vocab}",
              f"--config.data.max_bytes={max_bytes}", "--config.training.eval_every=2",
              "--config.training.eval_batches=1", "--config.training.log_every=1",
              "--config.checkpoint.every=1000", "--config.training.peak_flops=1e11",
              "--config.optimizer.warmup_steps=1"]
    runs = {}
    for arm in arms:
        config, overrides = ARMS[arm]
        print(f"{preset}: training {arm} for 2 steps ...", flush=True)
        runs[arm] = run_one(f"{arm}_{preset}", config, common + overrides, out)
        print(f"    peak host RSS {runs[arm]['peak_host_bytes'] / 2**30:.2f} GiB, "
              f"{runs[arm]['wall_s']:.0f} s", flush=True)
    return runs


def compiled(target: str, arms: list[str], seq_len: int, vocab: int, out: str
             ) -> dict[str, dict]:
    """arm -> the memory row of its train step compiled for `target` (PRESET@TOPOLOGY), each
    in its own `experiments.compile` process."""
    preset, _, topology = target.partition("@")
    if topology == "cpu":  # the measured runs' step, for this host
        shape = [f"--config.model.seq_len={seq_len}", "--config.data.batch_size=1",
                 f"--config.data.vocab_size={vocab}", f"--config.model.vocab_size={vocab}"]
    else:  # the base run's step, for the chips
        shape = ["--config.model.compute_dtype=bfloat16", "--config.model.remat=full",
                 "--config.model.scan_layers=True", "--mesh=data=1,fsdp=-1"]
    path = os.path.join(out, "logs", f"compile_{preset}_{topology.replace(':', '_')}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = {}
    for arm in arms:
        config, overrides = ARMS[arm]
        cmd = [sys.executable, "-m", "experiments.compile", f"--config={config}",
               f"--config.model.preset={preset}", f"--topology={topology}",
               "--decode_batch=0", f"--out={path}", *shape, *overrides]
        print(f"{target}: compiling {arm}'s train step ...", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: compiling {arm} for {target} failed:\n"
                             f"{done.stderr[-2000:]}")
        with open(path) as f:
            rows[arm] = json.loads(f.readlines()[-1])
        print(f"    {_gib_or_refused(rows[arm])} GiB per device, "
              f"{rows[arm]['compile_s']:.0f} s", flush=True)
    return rows


def _saved(row: dict, reference: dict | None) -> str:
    if reference is None or None in (row["total_bytes"], reference["total_bytes"]):
        return "-"
    return f"{1 - row['total_bytes'] / reference['total_bytes']:+.0%}"


def _gib_or_refused(row: dict) -> str:
    if row["total_bytes"] is None:
        return f"refused (temporaries {row.get('temp_bytes', 0) / 2**30:,.2f})"
    return f"{row['total_bytes'] / 2**30:,.2f}"


def report(results: dict) -> str:
    def gib(b):
        return f"{b / 2**30:,.2f}"

    lines = ["# Memory at size", "", *[f"`{c}`  " for c in results["commands"]], "",
             "## Parameters and optimizer state (exact, from eval_shape)", "",
             "Whole-model bytes (divide by the fsdp degree for a device's share). Saved: "
             "against dense AdamW at the same preset.", "",
             "| preset | arm | params | param GiB | opt state GiB | opt state by group GiB | "
             "opt state saved | params + state saved | the seed claimed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for preset, arms in results.get("state", {}).items():
        base = arms[BASELINE]
        base_total = base["params_bytes"] + base["opt_state_bytes"]
        for arm, m in arms.items():
            total = m["params_bytes"] + m["opt_state_bytes"]
            lines.append(f"| {preset} | {arm} | {m['params']:,} | {gib(m['params_bytes'])} | "
                         f"{gib(m['opt_state_bytes'])} | "
                         f"{', '.join(f'{g} {gib(b)}' for g, b in m['groups'].items()) or '-'} | "
                         f"{1 - m['opt_state_bytes'] / base['opt_state_bytes']:+.0%} | "
                         f"{1 - total / base_total:+.0%} | {SEED_CLAIMS.get(arm, '')} |")
    if results.get("measured"):
        preset = results["measure_preset"]
        runs = results["measured"]
        base = runs[BASELINE]["peak_host_bytes"]
        lines += ["", f"## Measured: peak host RSS of 2 training steps at {preset}", "",
                  f"Batch 1 x {results['seq_len']} tokens on this CPU, each arm its own process "
                  f"(parameters, gradients, optimizer state, activations, XLA's buffers and the "
                  f"runtime).", "", "| arm | peak host GiB | saved vs dense AdamW | wall s |",
                  "|---|---|---|---|"]
        for arm, r in runs.items():
            lines.append(f"| {arm} | {gib(r['peak_host_bytes'])} | "
                         f"{1 - r['peak_host_bytes'] / base:+.0%} | {r['wall_s']:.0f} |")
    for target, rows in results.get("compiled", {}).items():
        lines += ["", f"## Compiled: the train step at {target.replace('@', ' for ')}", "",
                  _compiled_caption(rows.get(TERNARY_BASELINE, rows[BASELINE])), "",
                  "Saved: against the same model trained with AdamW (the ternary arms' "
                  "reference: the optimizer alone differs) and against dense AdamW (whose "
                  "bf16 dense matmuls keep larger activations than the ternary kernel's).", "",
                  "| arm | arguments GiB | temporaries GiB | total GiB / device | "
                  "saved vs ternary AdamW | saved vs dense AdamW | HBM GiB | fits | compile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm, r in rows.items():
            against = rows.get(TERNARY_BASELINE) if r.get("ternary", True) else None
            fits = "-" if "fits" not in r else ("yes" if r["fits"] else "**no**")
            lines.append(f"| {arm} | {gib(r['argument_bytes']) if 'argument_bytes' in r else '-'}"
                         f" | {gib(r['temp_bytes']) if r.get('temp_bytes') else '-'} | "
                         f"{_gib_or_refused(r)} | {_saved(r, against)} | "
                         f"{_saved(r, rows[BASELINE])} | "
                         f"{gib(r['hbm_bytes']) if r.get('hbm_bytes') else '-'} | {fits} | "
                         f"{r['compile_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _compiled_caption(row: dict) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in row["mesh"].items())
    blocks = "scanned" if row.get("scan_layers") else "unrolled"
    return (f"{row['chips']} x {row['device_kind']}, mesh {mesh}, batch {row['batch']} x "
            f"{row['seq_len']}, {row['compute_dtype']}, remat {row['remat']}, {blocks} blocks; "
            f"per device, "
            f"from XLA's memory analysis of the compiled step (arguments: parameters, "
            f"optimizer state and the batch; temporaries: gradients, activations and the "
            f"update's intermediates). Command: `{row['command']}` (and the arm's config).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="350m,1b,7b")
    parser.add_argument("--measure", default="350m", help="preset to train 2 steps at ('' off)")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE ids of the measured runs")
    parser.add_argument("--max_bytes", type=int, default=4_000_000,
                        help="corpus bytes for the measured runs")
    parser.add_argument("--compile", default="350m@cpu,1b@v5e:2x2,7b@v5p:2x2x1",
                        help="PRESET@TOPOLOGY,... to compile each arm's train step for "
                             "(cpu: this host; '' off)")
    parser.add_argument("--out", default=os.path.join("docs", "benchmarks", "memory"))
    parser.add_argument("--update", action="store_true",
                        help="add the sections asked for to DIR's existing report")
    parser.add_argument("--regenerate", action="store_true",
                        help="compute nothing: rewrite DIR/report.md from DIR/results.json")
    args = parser.parse_args(argv)
    if args.regenerate:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
        save_study(args.out, results, report(results))
        return
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or BASELINE not in arms:
        parser.error(f"--arms: unknown {unknown} (choose from {', '.join(ARMS)}); "
                     f"{BASELINE} is the reference and must be among them")
    targets = [t for t in args.compile.split(",") if t]
    malformed = [t for t in targets if not t.partition("@")[2]]
    if malformed:
        parser.error(f"--compile: {malformed} is not PRESET@TOPOLOGY (350m@cpu, 1b@v5e:2x2)")
    path = os.path.join(args.out, "results.json")
    if os.path.exists(path) != args.update:
        raise SystemExit(f"error: {args.out} already holds a report; choose another --out or "
                         f"add to it with --update" if not args.update else
                         f"error: --update: {path} does not exist")
    results = {"commands": []}
    if args.update:
        with open(path) as f:
            results = json.load(f)
        results.setdefault("commands", [results.pop("command", None)])
    os.makedirs(args.out, exist_ok=True)
    results["commands"].append("python -m experiments.memory_at_size " + " ".join(
        f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(args).items()
        if v is not False))
    if args.presets:
        results["state"] = state_table(args.presets.split(","), arms)
    if args.measure:
        results.update(seq_len=args.seq_len, measure_preset=args.measure,
                       measured=measure(args.measure, args.seq_len, args.out, arms,
                                        args.vocab, args.max_bytes))
    for target in targets:
        results.setdefault("compiled", {})[target] = compiled(target, arms, args.seq_len,
                                                              args.vocab, args.out)
    save_study(args.out, results, report(results))


if __name__ == "__main__":
    main()
