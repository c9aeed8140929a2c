"""The studies behind the E3 report's claims: memory at size and Collider's fidelity. Structure
only (the numbers are the studies' own output)."""

import json

import pytest

from experiments import collider_study, memory_at_size


def test_state_bytes_per_arm_come_from_eval_shape_and_name_the_seeds_claims(tmp_path):
    out = tmp_path / "memory"
    memory_at_size.main(["--presets=tiny", "--measure=", "--compile=", f"--out={out}",
                         "--arms=adamw_dense,adamw_ternary,e3_muon_8bit"])
    results = json.loads((out / "results.json").read_text())
    tiny = results["state"]["tiny"]
    dense, muon8 = tiny["adamw_dense"], tiny["e3_muon_8bit"]
    # AdamW: two fp32 moments (plus a few step counters)
    assert dense["opt_state_bytes"] == pytest.approx(2 * dense["params_bytes"], rel=1e-4)
    assert muon8["opt_state_bytes"] < dense["opt_state_bytes"]
    report = (out / "report.md").read_text()
    assert "| tiny | e3_muon_8bit |" in report and "86% less optimizer memory" in report
    with pytest.raises(SystemExit):  # the reference arm is required
        memory_at_size.main(["--presets=tiny", "--measure=", "--arms=e3_muon",
                             f"--out={tmp_path / 'other'}"])
    with pytest.raises(SystemExit):  # a second report into the same directory
        memory_at_size.main(["--presets=tiny", "--measure=", "--compile=", f"--out={out}",
                             "--arms=adamw_dense"])


@pytest.mark.slow
def test_compiled_memory_is_added_to_a_report_per_arm_from_the_compile_command(tmp_path):
    out = tmp_path / "memory"
    arms = "--arms=adamw_dense,e3_muon_8bit"
    memory_at_size.main(["--presets=tiny", "--measure=", "--compile=", f"--out={out}", arms])
    memory_at_size.main(["--presets=", "--measure=", "--compile=tiny@cpu", "--seq_len=32",
                         "--vocab=1024", f"--out={out}", arms, "--update"])
    results = json.loads((out / "results.json").read_text())
    assert "tiny" in results["state"]  # kept from the first command
    assert len(results["commands"]) == 2
    rows = results["compiled"]["tiny@cpu"]
    dense, muon8 = rows["adamw_dense"], rows["e3_muon_8bit"]
    assert dense["optimizer"] == "adamw" and muon8["optimizer"] == "muon_8bit"
    assert (dense["batch"], dense["seq_len"]) == (1, 32)
    # arguments hold the parameters and optimizer state: 8-bit Muon's state is smaller
    assert muon8["argument_bytes"] < dense["argument_bytes"]
    report = (out / "report.md").read_text()
    assert "## Compiled: the train step at tiny for cpu" in report
    assert "| saved vs ternary AdamW | saved vs dense AdamW |" in report
    assert "| e3_muon_8bit |" in report.split("## Compiled")[1]


@pytest.mark.slow
def test_measured_memory_trains_each_arm_in_its_own_process(tmp_path):
    out = tmp_path / "memory"
    memory_at_size.main(["--presets=tiny", "--measure=tiny", "--seq_len=32", f"--out={out}",
                         "--arms=adamw_dense,e3_muon", "--vocab=1024",
                         "--max_bytes=2000000", "--compile="])  # (compiling: the test above)
    measured = json.loads((out / "results.json").read_text())["measured"]
    assert set(measured) == {"adamw_dense", "e3_muon"}
    assert all(r["peak_host_bytes"] > 2**27 for r in measured.values())  # a JAX process
    assert "## Measured: peak host RSS of 2 training steps at tiny" in (
        out / "report.md").read_text()


@pytest.mark.slow
def test_collider_study_trains_measures_fidelity_and_times_the_backward(tmp_path):
    out = tmp_path / "collider"
    collider_study.main(["--steps=4", "--ref_step=2", "--seq_len=32", "--batch=4",
                         "--vocab=1024", "--max_bytes=2000000", "--n_layers=1", "--rounds=1",
                         "--keeps=0.5", f"--out={out}"])
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"keep1.0", "keep0.5_loss", "keep0.5_excess"}
    assert set(results["fidelity"]) == {"1.0@32", "0.5@32", "1.0@128", "0.5@128"}
    for key in ("1.0@32", "1.0@128"):  # keep 1.0 is the exact gradient: cosine 1
        assert all(c == pytest.approx(1.0, abs=1e-4) for c in results["fidelity"][key].values())
    assert all(-1.0001 <= c <= 1.0001 for v in results["fidelity"].values() for c in v.values())
    assert {"unfiltered", "keep 1", "keep 0.5"} == set(results["timing"])
    report = (out / "report.md").read_text()
    assert "## Fidelity" in report and "## Backward time" in report
