"""Running the E3 benchmark's runs: each one `python -m experiments.run` in a child process
(so its peak host memory is its own), summarised from its metrics.jsonl; the learning-rate
sweep's grid, winners and extra seeds; the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from experiments.benchmark.plan import SEED_FLAG, lr_grid


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


def from_disk(out: str, name: str) -> dict:
    """A run's summary from its metrics.jsonl alone (wall time: its last evaluation's)."""
    with open(os.path.join(out, "runs", name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    wall = max(r.get("training/wall_s") or 0 for r in rows)
    return summarise(name, "", rows, wall, 0, "")


def machine() -> dict:
    import jax

    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def sweep(runs: list[tuple[str, str, list[str]]], multiples: list[float], seeds: int,
          train: Callable[[str, str, list[str]], dict]) -> tuple[list[dict], dict]:
    """Grid, winners, seeds. -> (each arm's best-rate seed-0 run, the sweep's record)."""
    grid: dict[str, list[dict]] = {}
    best: dict[str, tuple[dict, list[str], str]] = {}
    for name, config, overrides, arm, multiple, lr in lr_grid(runs, multiples):
        result = train(name, config, overrides)
        grid.setdefault(arm, []).append({"multiple": multiple, "lr": lr,
                                         "val_ce": result["val_ce"], "run": name,
                                         "loop": result["loop"]})
        if arm not in best or result["val_ce"] < best[arm][0]["val_ce"]:
            best[arm] = (result, overrides, config)
    winners, results = {}, []
    for arm, (result, overrides, config) in best.items():
        seeded = [result] + [train(f"{result['name']}_seed{s}", config,
                                   [*overrides, f"{SEED_FLAG}{s}"]) for s in range(1, seeds)]
        lr = next(p["lr"] for p in grid[arm] if p["run"] == result["name"])
        winners[arm] = winner_record(lr, seeded)
        results.append({**result, "name": arm, "lr": lr})
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
