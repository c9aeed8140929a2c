"""The bits-per-byte command reproduces the run's own final evaluation."""

import json

import pytest

from nanochat_jax.cli.bpb import main
from nanochat_jax.eval.bpb import evaluate_bpb


@pytest.mark.slow
def test_bpb_of_a_checkpoint_equals_the_runs_final_eval(trained_run, capsys):
    workdir, c, summary = trained_run
    got = evaluate_bpb(workdir)
    assert got["step"] == 6 and got["batches"] == c.training.eval_batches
    assert got["eval/bpb"] == pytest.approx(summary["eval/bpb"], rel=1e-6)
    assert got["eval/ce"] == pytest.approx(summary["eval/ce"], rel=1e-6)
    main(["--checkpoint", workdir, "--batches", "1"])
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["batches"] == 1
