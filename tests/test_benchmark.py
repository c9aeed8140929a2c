"""The E3 benchmark runs every configuration end to end and writes a well-formed report
(structure, not timings: those are machine noise)."""

import argparse
import json

import numpy as np
import pytest

from experiments.benchmark import plan, runner
from experiments.benchmark.__main__ import main
from experiments.benchmark.plan import BASELINES, is_looped, lr_grid
from experiments.benchmark.report import (
    CLAIMS,
    claim_verdicts,
    headline_section,
    noise_verdict,
    time_to_dense,
)
from experiments.benchmark.runner import loop_use, winner_record
from experiments.configs import e3
from experiments.configs.loading import split_configs
from nanochat_jax.train import metrics

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_benchmark_writes_results_report_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["--quick", "--steps=3", "--evals=1", "--eval_batches=1", "--configs=e3_muon_8bit",
          "--vocab=1024", "--max_bytes=2000000", f"--out={out}", "--config.model.n_layers=1"])
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == [*BASELINES, "e3_muon_8bit"]
    assert results["machine"]["backend"] == "cpu" and results["peak"] > 0
    for r in results["runs"]:
        assert r["final_step"] == 3 and r["val_ce"] > 0 and r["tokens_per_sec"] > 0
        assert r["params_bytes"] > 0 and r["opt_state_bytes"] > 0 and r["peak_host_bytes"] > 0
        assert "--config.model.preset=tiny" in r["command"]
    by_name = {r["name"]: r for r in results["runs"]}
    # the 8-bit optimizer keeps less state than AdamW on the same parameters
    assert by_name["e3_muon_8bit"]["opt_state_bytes"] < by_name["adamw_dense"]["opt_state_bytes"]
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | val CE | val bpb | tokens/s | vs dense |")
    assert [line.split(" | ")[0][2:] for line in table[1:4]] == names
    assert table[1].split(" | ")[4] == "1.00"  # the dense baseline against itself
    for claim, _ in CLAIMS:
        assert f"| {claim} |" in report
    for png in ("loss_vs_tokens.png", "loss_vs_wall.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == PNG and f"({png})" in report
    assert "wrote" in capsys.readouterr().out


def test_bad_arguments_fail_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="unknown config"):
        main(["--quick", "--configs=e3_nope", f"--out={tmp_path}"])
    with pytest.raises(SystemExit):
        main(["--quick", "--stepz=3", f"--out={tmp_path}"])


def _quick_args(configs: list[str]) -> argparse.Namespace:
    """The flags of a tiny-model benchmark of `configs`, as main parses them."""
    return argparse.Namespace(steps=10, model="tiny", seq_len=128, batch=16, max_bytes=0,
                              vocab=8192, evals=2, eval_batches=1, peak=1e9, configs=configs)


def test_tiny_runs_take_their_rates_from_the_configs():
    """At the tiny model every run gets the AdamW-group rate and GaLore projection e3:full
    sets; the AdamW baselines get tiny's AdamW rate and Lion a fifth of it (as e3:lion
    against base's); the Muon arms and e3:full keep their own rates."""
    runs = {name: overrides for name, _, overrides in
            plan.runs(_quick_args(["e3_lion", "e3:muon", "e3:full"]), [])}
    full = e3.get_config("full").optimizer
    for overrides in runs.values():
        assert "--config.optimizer.adam_lr=3e-3" in overrides and full.adam_lr == 3e-3
        assert f"--config.optimizer.galore.rank={full.galore.rank}" in overrides
    lrs = {name: plan.last_override(overrides, plan.LR_FLAG) for name, overrides in runs.items()}
    assert lrs == {"adamw_dense": "3e-3", "adamw_ternary": "3e-3", "e3_lion": "6e-4",
                   "e3_muon": None, "e3_full": None}


def test_a_config_variant_is_an_arm_of_its_own():
    """`--configs=e3_full:seed` (old spelling) and `e3:full,seed` run the seed's E3 setting
    under its own name, e3_full_seed."""
    args = _quick_args(["e3_full", "e3_full:seed", "e3:muon", "e3:full,seed"])
    runs = [(name, config) for name, config, _ in plan.runs(args, [])]
    assert runs[2:] == [("e3_full", "e3_full"), ("e3_full_seed", "e3_full:seed"),
                        ("e3_muon", "e3:muon"), ("e3_full_seed", "e3:full,seed")]
    seed, ours = e3.get_config("full,seed"), e3.get_config("full")
    assert (seed.mtp.depth, seed.collider.keep_ratio) == (3, 0.5)
    assert (ours.mtp.depth, ours.collider.keep_ratio) == (1, 0.7)
    assert not seed.loop.enabled and not seed.mhc.enabled and ours.loop.enabled
    with pytest.raises(ValueError, match="variant"):
        e3.get_config("full,nope")


def test_a_configs_list_is_space_separated_and_commas_stay_a_configs_variants():
    assert split_configs("e3:muon e3:full,seed  e3_lion tiny:rust,gguf") == [
        "e3:muon", "e3:full,seed", "e3_lion", "tiny:rust,gguf"]
    assert split_configs("e3_muon e3_full:seed") == ["e3_muon", "e3_full:seed"]
    for old_style in ("e3_muon,e3_full", "e3:muon,e3:full", "e3:muon,e3_lion"):
        with pytest.raises(SystemExit, match="separate configs with spaces"):
            split_configs(old_style)


def test_lr_grid_centres_each_arm_on_its_own_rate_and_verdicts_respect_noise():
    runs = [("adamw_dense", "base", ["--config.optimizer.lr=3e-3"]),
            ("e3_muon", "e3_muon", []),  # e3_muon's own optimizer.lr: 0.02
            ("looped", "e3_muon", ["--config.loop.enabled=True"])]
    grid = lr_grid(runs, [0.5, 1, 2])
    assert [(arm, lr) for _, _, _, arm, _, lr in grid] == [
        ("adamw_dense", 0.0015), ("adamw_dense", 0.003), ("adamw_dense", 0.006),
        ("e3_muon", 0.01), ("e3_muon", 0.02), ("e3_muon", 0.04),
        # LoopLM reaches one step lower (Ouro: looped models want smaller rates)
        ("looped", 0.005), ("looped", 0.01), ("looped", 0.02), ("looped", 0.04)]
    assert [m for *_, arm, m, _ in grid if arm == "looped"] == [0.25, 0.5, 1, 2]
    assert is_looped("e3_full", []) and not is_looped("e3_full:seed", [])  # read from configs
    name, config, overrides, *_ = grid[3]
    assert (name, config, overrides[-1]) == ("e3_muon_lr0.01", "e3_muon",
                                             "--config.optimizer.lr=0.01")
    assert noise_verdict(5.0, 0.05, 5.5, 0.05) == "better"
    assert noise_verdict(5.7, 0.05, 5.5, 0.05) == "worse"
    assert noise_verdict(5.45, 0.05, 5.5, 0.05) == "within noise"


def test_loop_use_reads_per_loop_ce_and_the_exit_distribution_from_the_last_log():
    logs = [{"step": 10, "loop/ce/step1": 7.0, "loop/ce/step2": 6.9,
             "loop/mean_exit_step": 1.9, "loop/exit_entropy": 0.3},
            {"step": 20, "loop/ce/step1": 6.5, "loop/ce/step2": 6.0,
             "loop/mean_exit_step": 1.7, "loop/exit_entropy": 0.6}]
    use = loop_use(logs)
    assert use["step"] == 20 and use["ce_per_loop"] == [6.5, 6.0]
    assert use["spread"] == pytest.approx(0.5) and use["mean_exit_step"] == 1.7
    assert loop_use([{"step": 20, "loss/total": 6.0}]) is None  # no loops, nothing to say


def test_lr_sweep_reports_the_grid_and_the_winners_over_seeds(tmp_path, monkeypatch):
    """`--sweep=lr`: every arm at each multiple of its own rate, the best rate rerun with
    more seeds, the grid and winners in results.json and the report. The runs are stand-ins
    whose validation CE is known (dense AdamW best at half its rate, the others at their
    own; seed s adds 0.01 s): what is checked is the sweep, not training, which
    `test_quick_benchmark_writes_results_report_and_plots` runs for real."""
    preferred = {"adamw_dense": 0.5, "adamw_ternary": 1.0, "e3_muon_8bit": 1.0}
    calls = []

    def stand_in(name, config, overrides, out):
        arm = next(a for a in preferred if name.startswith(a + "_lr"))
        lr = float(plan.last_override(overrides, plan.LR_FLAG))
        seed = int(plan.last_override(overrides, plan.SEED_FLAG) or 0)
        own = plan.centre_lr(config, overrides[:-1] if seed == 0 else overrides[:-2])
        ce = 5.0 + (0.0 if lr == pytest.approx(own * preferred[arm]) else 0.2) + 0.01 * seed
        calls.append((name, lr, seed))
        rows = [{"step": 0, "memory/params_bytes": 100, "memory/opt_state_bytes": 200},
                {"step": 0, "eval/ce": 6.9, "eval/bpb": 4.6, "training/wall_s": 0.0},
                {"step": 2, "loss/total": ce, "throughput/tokens_per_sec": 1e3,
                 "throughput/mfu": 0.1},
                {"step": 2, "eval/ce": ce, "eval/bpb": ce / 1.5, "training/wall_s": 1.0}]
        return runner.summarise(name, config, rows, 1.0, 2**20, "-m experiments.run")

    monkeypatch.setattr(runner, "run_one", stand_in)
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda: 1e11)
    out = tmp_path / "sweep"
    main(["--quick", "--steps=2", "--evals=1", "--configs=e3_muon_8bit", f"--out={out}",
          "--sweep=lr", "--lrs=0.5,1", "--seeds=2"])
    arms = [*BASELINES, "e3_muon_8bit"]
    assert len(calls) == 3 * 2 + 3  # the grid, then one more seed of each arm's best rate
    assert [seed for _, _, seed in calls] == [0] * 6 + [1] * 3
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == arms
    sweep = results["sweep"]
    assert list(sweep["grid"]) == arms and all(len(p) == 2 for p in sweep["grid"].values())
    for arm, w in sweep["winners"].items():
        best = min(sweep["grid"][arm], key=lambda p: p["val_ce"])
        assert best["multiple"] == preferred[arm]
        assert w["lr"] == best["lr"] and w["val_ce"] == [5.0, 5.01]
        assert w["std"] == pytest.approx(np.std([5.0, 5.01], ddof=1))
        assert [lr for name, lr, seed in calls if name.startswith(arm + "_lr") and seed] == [
            w["lr"]]  # the extra seed ran at the winning rate
    report = (out / "report.md").read_text()
    assert "## Learning-rate sweep" in report and "| x0.5 | x1 |" in report
    assert "| e3_muon_8bit | 0.02 | 5.005 +- 0.007 | within noise |" in report
    assert (out / "sweep_lr.png").read_bytes()[:8] == PNG and "(sweep_lr.png)" in report


def _seed_run(name, finals, walls):
    """A seed's summary: evaluations at steps 0, 50, 100 with these CEs and wall times."""
    return {"name": name, "val_ce": finals[-1], "wall_s": walls[-1], "tokens_per_sec": 1.0,
            "evals": [{"step": 50 * i, "ce": c, "bpb": 0.0, "wall_s": w}
                      for i, (c, w) in enumerate(zip(finals, walls, strict=True))]}


def test_time_to_dense_and_the_claims_are_judged_on_the_error_bars():
    dense = [_seed_run("d", [9.0, 6.5, 6.0], [0, 50, 100]),
             _seed_run("d1", [9.0, 6.5, 6.2], [0, 52, 104])]  # target: mean 6.1
    muon = [_seed_run("m", [9.0, 6.0, 5.5], [0, 40, 80]),  # reaches 6.1 at the middle eval
            _seed_run("m1", [9.0, 6.05, 5.6], [0, 42, 84])]
    info = {"tokens_per_step": 10, "evals": 2, "model": "tiny", "sweep": {"winners": {
        "adamw_dense": winner_record(3e-3, dense), "e3_muon": winner_record(0.02, muon)}}}
    reach = time_to_dense(info)
    assert reach["adamw_dense"]["target"] == pytest.approx(6.1)
    assert reach["adamw_dense"]["reached"] == 1  # seed d1 ends above the mean
    r = reach["e3_muon"]
    assert r["reached"] == 2 and r["seconds"][0] == pytest.approx(41)
    assert r["speedup"][0] == pytest.approx(np.mean([102 / 40, 102 / 42]))
    assert r["token_ratio"] == (0.5, 0.0)  # 500 of dense's 1,000 tokens
    assert "| e3_muon | 2/2 | 41 +- 1 |" in "\n".join(headline_section(info))
    results = [{"name": "adamw_dense", "config": "base", "params_bytes": 100,
                "opt_state_bytes": 200},
               {"name": "e3_muon", "config": "e3_muon", "params_bytes": 100,
                "opt_state_bytes": 150}]
    text = "\n".join(claim_verdicts(results, info))
    # 2.49 +- 0.08x: faster beyond the error bars, 2x beyond them too
    assert "Held: e3_muon is at least 2x faster" in text
    assert "Held: e3_muon need(s) at least 15% fewer tokens" in text
    assert "Did not hold at this size: at most 17% (e3_muon)" in text  # 1 - 250 / 300
