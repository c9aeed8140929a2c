"""The eval and GRPO commands run from a trained checkpoint: bpb, compile and pass rates, and
an epoch of training-free GRPO that writes its library."""

import json

import pytest

from nanochat_jax.cli import grpo
from nanochat_jax.cli.eval import main as eval_main
from nanochat_jax.errors import EvalError
from nanochat_jax.eval.code import (
    Sampler,
    _after,
    evaluate_code,
    load_generations,
    save_generations,
)
from nanochat_jax.eval.problems import BUILTIN_PROBLEMS, load_problems
from nanochat_jax.eval.sandbox import rustc_available
from nanochat_jax.infer.engine import Engine
from nanochat_jax.infer.load import load

needs_rustc = pytest.mark.skipif(not rustc_available(), reason="needs rustc (apt-get install "
                                 "rustc); .ci/run installs it")


@pytest.mark.slow
@needs_rustc
def test_eval_command_prints_bpb_and_code_metrics(trained_run, tmp_path, capsys):
    workdir, _, summary = trained_run
    out = tmp_path / "metrics.json"
    eval_main(["--checkpoint", workdir, "--max_new_tokens=16", "--out", str(out)])
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["eval/bpb"] == pytest.approx(summary["eval/bpb"], rel=1e-6)
    assert {"eval/compile_rate", "eval/pass_rate", "eval/pass_at_1"} <= set(metrics)
    assert "eval/compile_rate" in printed and "eval/bpb" in printed


@pytest.mark.slow
@needs_rustc
def test_generations_saved_by_one_eval_are_rescored_by_another_without_a_model(
        trained_run, tmp_path, capsys):
    workdir = trained_run[0]
    saved, first, second = (tmp_path / n for n in ("gen.jsonl", "a.json", "b.json"))
    eval_main(["--checkpoint", workdir, "--max_new_tokens=16", "--batches=1",
               f"--save_generations={saved}", f"--out={first}"])
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 12 and {r["step"] for r in rows} == {load(workdir).step}
    eval_main([f"--load_generations={saved}", f"--out={second}"])  # no checkpoint, no model
    printed = capsys.readouterr().out
    a, b = (json.loads(p.read_text()) for p in (first, second))
    for key in ("eval/compile_rate", "eval/pass_rate", "eval/pass_at_1"):
        assert a[key] == b[key]
    assert "eval/bpb" in a and "eval/bpb" not in b
    assert "12 problems from builtin, 1 completion(s) each from" in printed
    with pytest.raises(SystemExit):
        eval_main([f"--load_generations={saved}", "--checkpoint", workdir])


def test_load_generations_refuses_a_file_for_another_problem_set(tmp_path):
    problems = load_problems(BUILTIN_PROBLEMS)
    path = str(tmp_path / "gen.jsonl")
    save_generations(path, problems[:2], [["a", "b"], ["c", "d"]], step=3)
    assert load_generations(path, problems[:2]) == [["a", "b"], ["c", "d"]]
    with pytest.raises(EvalError, match="without generations"):
        load_generations(path, problems[:3])
    with pytest.raises(EvalError, match="not in the set"):
        load_generations(path, problems[:1])


@needs_rustc
def test_code_metrics_count_what_the_verifier_says():
    """A 'model' that always answers with the canonical solution passes everything; one that
    answers with a type error compiles nothing."""
    problems = load_problems(BUILTIN_PROBLEMS)[:3]

    class Oracle:
        def __init__(self, answer):
            self.answer = answer

        def __call__(self, prompts, n, temperature):
            return [[self.answer(p)] * n for p in prompts]

    by_prompt = {p.prompt: p.canonical_solution for p in problems}
    right = evaluate_code(Oracle(by_prompt.get), problems, samples=2, temperature=0.5)
    assert right["eval/compile_rate"] == right["eval/pass_rate"] == right["eval/pass_at_1"] == 1.0
    wrong = evaluate_code(Oracle(lambda p: '    "not a number"\n}\n'), problems)
    assert wrong["eval/compile_rate"] == wrong["eval/pass_rate"] == 0.0


@pytest.mark.slow
@needs_rustc
def test_grpo_command_runs_an_epoch_and_writes_its_library(trained_run, tmp_path, capsys):
    problems = tmp_path / "two.jsonl"
    problems.write_text("".join(line for line in open(BUILTIN_PROBLEMS).readlines()[:2]))
    library = tmp_path / "lessons.json"
    grpo.main(["--checkpoint", trained_run[0], "--library", str(library), "--problems",
               str(problems), "--epochs=1", "--group_size=2", "--max_new_tokens=16"])
    printed = capsys.readouterr().out
    saved = json.loads(library.read_text())
    assert saved["epoch"] == 0 and saved["max_items"] == 16
    stats = json.loads(next(ln for ln in printed.splitlines() if ln.startswith("{")))
    assert stats["epoch"] == 0 and 0 <= stats["compile_rate"] <= 1
    # resuming continues with the next epoch
    grpo.main(["--checkpoint", trained_run[0], "--library", str(library), "--problems",
               str(problems), "--epochs=1", "--group_size=2", "--max_new_tokens=16"])
    assert json.loads(library.read_text())["epoch"] == 1


@pytest.mark.slow
def test_sampler_returns_n_completions_per_prompt(trained_run):
    loaded = load(trained_run[0])
    sampler = Sampler(Engine(loaded.model, loaded.variables), loaded.tokenizer,
                      max_new_tokens=6, batch_size=4)
    out = sampler(["fn a() {\n", "fn b() {\n", "fn c() {\n"], 3, 0.8)
    assert [len(c) for c in out] == [3, 3, 3]
    assert len({c for cs in out for c in cs}) > 1  # sampled, not one repeated answer
    assert sampler.calls == 3  # 9 rows in batches of 4


def test_sampler_heals_the_prompts_trailing_whitespace():
    """The prompt goes to the model without its trailing whitespace; what the model writes
    first of that whitespace is dropped, so the completion continues the whole prompt."""
    assert _after("\n    let x = 1;", "\n") == "    let x = 1;"
    assert _after(" {\n    x", "\n") == " {\n    x"  # the model went elsewhere: kept whole
    assert _after("\n", "\n\n") == ""
