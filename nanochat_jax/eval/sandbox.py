"""Compile and test Rust code in a throwaway sandbox.

Every rustc and test process gets a fresh temporary directory as its working directory, a
minimal environment, no stdin, caps on address space, CPU time and file size (`ulimit` in
`sh`, so nothing runs in the forked child before exec), and a wall-clock timeout that kills
its whole process group. Test binaries also run in a new network namespace (`unshare -n`, or
`unshare -rn` through a user namespace where only that is allowed), so generated code cannot
reach the network; where neither works, `network_isolation()` says so and commands print it.
That contains the runaway loops, allocations and connections of generated code; it is not a
security boundary (the code can still read files): run untrusted generations inside a
container.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from nanochat_jax.errors import EvalError

STATUSES = ("ok", "compile_error", "test_failure", "timeout", "memory", "runtime_error")
EDITION = "2021"  # Debian's rustc 1.63 (CI) and rustup's 1.95 both support it
# rustc maps ~450 MB of address space (libLLVM, librustc_driver, thread stacks) before it
# compiles anything; measured on 2 cores, --test builds need ~500 MB (rustup's 1.95 and, with
# MALLOC_ARENA_MAX below, Debian's 1.63). The floor leaves 1.5x of that, the default 2x.
MIN_MEMORY_MB = 768
# glibc reserves 64 MB of address space per malloc arena, up to 8 per core: without a cap on
# arenas, Debian's rustc (glibc malloc) needs ~1 GB on 2 cores, and more on bigger machines.
MALLOC_ARENAS = "2"
FILE_LIMIT_MB = 64  # the largest file a sandboxed process may write; a test binary is ~7 MB
OUTPUT_CHARS = 4096  # process output kept in a RustResult: its head and its tail
PANIC_EXIT = 101  # the exit code of a Rust program whose main thread (or a libtest test) panicked
INSTALL_HINT = ("install it with rustup (https://rustup.rs) or `apt-get install rustc`, "
                "or point $RUSTC at a rustc binary")
_ERROR_CODE = re.compile(r"^error\[(E\d{4})\]", re.MULTILINE)
_ALLOC_FAILED = re.compile(r"memory allocation of \d+ bytes failed")


def find_rustc() -> str:
    """The rustc to use: $RUSTC, else `rustc` on PATH, else rustup's ~/.cargo/bin/rustc."""
    if os.environ.get("RUSTC"):
        path = os.environ["RUSTC"]
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise EvalError(f"$RUSTC={path} is not an executable file; {INSTALL_HINT}")
        return path
    rustup = os.path.expanduser("~/.cargo/bin/rustc")
    path = shutil.which("rustc") or (rustup if os.access(rustup, os.X_OK) else None)
    if path is None:
        raise EvalError(f"no rustc found (not on PATH, not in ~/.cargo/bin): {INSTALL_HINT}")
    return path


def rustc_available() -> bool:
    """Whether `find_rustc` finds a compiler (for callers that degrade without one)."""
    try:
        find_rustc()
    except EvalError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class RustResult:
    """What became of one build (and run): `status` is one of STATUSES.

    A build that rustc rejects, or that runs past the time or memory limit, is a
    "compile_error"; "timeout", "memory" and "runtime_error" are about the test run.
    """

    status: str
    error_codes: tuple[str, ...]  # rustc's error codes (E0308, ...) in order of first mention
    stderr: str  # the last process's output (rustc's or the tests'), interleaved, clipped
    seconds: float  # wall time of the build and the run together

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}: choose one of {STATUSES}")

    @property
    def compiles(self) -> bool:
        """rustc accepted the code."""
        return self.status != "compile_error"

    @property
    def passed(self) -> bool:
        """Every test passed (for a `check_compiles` result: the code compiled)."""
        return self.status == "ok"


@dataclasses.dataclass(frozen=True)
class _Exit:
    returncode: int | None  # None: killed at the wall-clock timeout; -N: killed by signal N
    output: str  # stdout and stderr, interleaved, clipped to OUTPUT_CHARS


def check_compiles(code: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> RustResult:
    """Type-check `code` as a library crate, without codegen: the compile-rate metric.

    `--emit=metadata` stops before LLVM: ~40 ms a small file, warm (+30 ms through rustup's
    proxy); `timeout` (seconds) and `memory_mb` (address space) bound rustc.
    """
    _check_limits(timeout, memory_mb)
    start = time.monotonic()
    with _sandbox(code) as tmp:
        build = _rustc(tmp, ["--crate-type", "lib", "--emit=metadata", "-o", "out.rmeta"],
                       timeout, memory_mb)
    return _build_result(build, timeout, time.monotonic() - start)


def run_tests(code: str, tests: str, *, timeout: float = 10.0,
              memory_mb: int = 1024) -> RustResult:
    """Build `code` followed by `tests` and run them; the build and the run each get the limits.

    With `#[test]` functions in `tests` they run under libtest (`rustc --test`); without, the
    file is built as a program whose `main` asserts (MultiPL-E's tests) and run.
    """
    _check_limits(timeout, memory_mb)
    libtest = "#[test]" in tests
    start = time.monotonic()
    with _sandbox(code + "\n" + tests) as tmp:
        build = _rustc(tmp, (["--test"] if libtest else []) + ["-o", "t"], timeout, memory_mb)
        if build.returncode != 0:
            return _build_result(build, timeout, time.monotonic() - start)
        argv = [*_network_prefix(), os.path.join(tmp, "t")] + (
            ["--test-threads=1"] if libtest else [])
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "RUST_BACKTRACE": "0",
               "MALLOC_ARENA_MAX": MALLOC_ARENAS}
        run = _run(argv, tmp, env, timeout, memory_mb, "t.log")
    return RustResult(_run_status(run, libtest), (), run.output, time.monotonic() - start)


@functools.cache
def _network_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program in a new network namespace with only a downed
    loopback: `unshare -n` (root, or CAP_SYS_ADMIN), else `unshare -rn` (an unprivileged
    user namespace, where the kernel allows them), else () when neither works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "-n"), (unshare, "-rn")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
    return ()


def network_isolation() -> str:
    """One line on how test binaries are kept off the network here."""
    prefix = _network_prefix()
    if not prefix:
        return ("test binaries CAN reach the network: `unshare -n` is not available or not "
                "permitted here (run generated code inside a container)")
    how = "unshare -n" if prefix[-1] == "-n" else "unshare -rn, a user namespace"
    return f"test binaries run without network access (a new network namespace: {how})"


def _check_limits(timeout: float, memory_mb: int) -> None:
    """Refuse limits under which rustc itself cannot work."""
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be positive (seconds)")
    if memory_mb < MIN_MEMORY_MB:
        raise ValueError(f"memory_mb={memory_mb} is below {MIN_MEMORY_MB}: rustc itself needs "
                         f"~500 MB of address space")


@contextlib.contextmanager
def _sandbox(source: str):
    """A fresh temporary directory holding `source` as main.rs; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="nanochat_rust_") as tmp:
        Path(tmp, "main.rs").write_text(source, encoding="utf-8")
        yield tmp


def _rustc(tmp: str, args: list[str], timeout: float, memory_mb: int) -> _Exit:
    """Run rustc on tmp/main.rs; warnings are silenced so the output holds only errors."""
    argv = [find_rustc(), "--edition", EDITION, "-A", "warnings", *args, "main.rs"]
    # PATH finds the linker (cc); HOME or RUSTUP_HOME lets rustup's proxy find its toolchain.
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.path.expanduser("~"),
           "TMPDIR": tmp, "MALLOC_ARENA_MAX": MALLOC_ARENAS}
    env |= {k: os.environ[k] for k in ("RUSTUP_HOME", "RUSTUP_TOOLCHAIN") if k in os.environ}
    return _run(argv, tmp, env, timeout, memory_mb, "rustc.log")


def _run(argv: list[str], tmp: str, env: dict[str, str], timeout: float, memory_mb: int,
         log: str) -> _Exit:
    """Run argv in tmp under the limits; its output goes to tmp/log (a file: no pipe to fill)."""
    log = os.path.join(tmp, log)
    with open(log, "wb") as out:
        proc = subprocess.Popen(_limited(argv, memory_mb, timeout), cwd=tmp, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        with contextlib.suppress(ProcessLookupError):  # also ends children left behind
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _Exit(returncode, _read_clipped(log))


def _limited(argv: list[str], memory_mb: int, timeout: float) -> list[str]:
    """argv run under caps on address space, CPU time and file size, set by `sh`'s ulimit
    before exec: no Python runs in the forked child (a `preexec_fn` can deadlock in a
    multithreaded parent such as a JAX process)."""
    cpu = 2 * math.ceil(timeout) + 1  # seconds: a backstop to the wall clock; threads add up
    limits = (f"ulimit -v {memory_mb * 1024} && ulimit -t {cpu} && "  # KiB, seconds
              f"ulimit -f {FILE_LIMIT_MB * 2048} && exec \"$0\" \"$@\"")  # 512-byte blocks
    return ["/bin/sh", "-c", limits, *argv]


def _read_clipped(path: str) -> str:
    """The file's text, or its head and tail when longer than OUTPUT_CHARS bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= OUTPUT_CHARS:
            data = f.read()
        else:
            head = f.read(OUTPUT_CHARS // 2)
            f.seek(size - OUTPUT_CHARS // 2)
            data = head + f"\n[... {size - OUTPUT_CHARS} bytes cut ...]\n".encode() + f.read()
    return data.decode("utf-8", errors="replace")


def _build_result(build: _Exit, timeout: float, seconds: float) -> RustResult:
    """The result of a build that is the last step: "ok", or a "compile_error" with its codes."""
    if build.returncode == 0:
        return RustResult("ok", (), build.output, seconds)
    output = build.output
    if build.returncode is None:
        output += f"\nrustc ran past the {timeout:g} s limit and was killed"
    codes = tuple(dict.fromkeys(_ERROR_CODE.findall(output)))
    return RustResult("compile_error", codes, output, seconds)


def _run_status(run: _Exit, libtest: bool) -> str:
    """Classify a test run by its exit: a killed run is a timeout, a panic a test failure."""
    if run.returncode is None or run.returncode == -signal.SIGXCPU:
        return "timeout"
    if run.returncode == -signal.SIGABRT and _ALLOC_FAILED.search(run.output):
        return "memory"  # Rust's allocation-error handler prints this, then aborts
    if run.returncode == 0 and (not libtest or "test result: ok" in run.output):
        return "ok"  # libtest's summary is required: a test calling exit(0) did not pass
    return "test_failure" if run.returncode == PANIC_EXIT else "runtime_error"


def rustc_version() -> str:
    """`rustc --version`, for reports."""
    out = subprocess.run([find_rustc(), "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr.strip()
