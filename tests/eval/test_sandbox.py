"""Rust evaluation's sandbox: compiling, running tests under limits, network isolation."""

import socket
import time

import pytest

from nanochat_jax.eval import sandbox
from nanochat_jax.eval.sandbox import check_compiles, network_isolation, run_tests, rustc_available

needs_rustc = pytest.mark.skipif(
    not rustc_available(),
    reason="needs rustc (set $RUSTC or install rustup / apt-get install rustc)")

ADD = "pub fn add(a: i64, b: i64) -> i64 {\n    a + b\n}\n"
ADD_TESTS = ("#[cfg(test)]\nmod tests {\n    use super::*;\n\n    #[test]\n"
             "    fn adds() {\n        assert_eq!(add(2, 3), 5);\n    }\n}\n")


def _libtest(body: str) -> str:
    """A test module with one #[test] function holding `body`."""
    return f"#[cfg(test)]\nmod tests {{\n    #[test]\n    fn t() {{\n        {body}\n    }}\n}}\n"


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


# network isolation


@needs_rustc
@pytest.mark.skipif(not sandbox._network_prefix(), reason="unshare -n / -rn is not permitted on "
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
    monkeypatch.setattr(sandbox, "_network_prefix", lambda: ())
    assert "CAN reach the network" in network_isolation()


# limits


def test_limits_too_small_for_rustc_are_refused():
    with pytest.raises(ValueError, match="memory_mb=256 is below"):
        check_compiles(ADD, memory_mb=256)
    with pytest.raises(ValueError, match="timeout=0 must be positive"):
        run_tests(ADD, ADD_TESTS, timeout=0)
