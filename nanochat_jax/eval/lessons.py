"""Rewards and lessons of a graded group of rollouts: the verifier's side of training-free
GRPO (grpo.py).

- Reward: the Rust verifier (`sandbox.run_tests`): 1.0 when the tests pass, 0.5 when the code
  compiles but fails, times out or crashes at run time, 0.0 when it does not compile.
- Rule-based summariser: the paper has the model summarise each trajectory and critique the
  group; a small model does that badly, so `lessons_from` builds lessons deterministically from
  the verifier's output: a table maps frequent rustc error codes to one-line fixes, failing
  libtest tests are named (and a passing attempt in the group is pointed out), timeouts and
  crashes get a lesson on loops and recursion. Causes are ranked by the summed group-relative
  advantage of the rollouts that show them (`group_advantages`); grpo.py proposes the first one
  that is not a near-duplicate of a library lesson (the library's `modify` is there for a model
  summariser).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Sequence

from nanochat_jax.eval.problems import Problem
from nanochat_jax.eval.sandbox import RustResult

MAX_LESSON_CHARS = 160
_FAILED_TEST = re.compile(r"^test (\S+) \.\.\. FAILED$", re.MULTILINE)
_TEST_FN = re.compile(r"#\[test\]\s*(?:#\[[^\]]*\]\s*)*fn\s+(\w+)")
_UNBALANCED = re.compile(r"unclosed delimiter|unexpected closing delimiter|mismatched closing")

ERROR_LESSONS = {
    "E0061": "E0061 wrong number of arguments: call each function with exactly the parameters "
             "its signature declares.",
    "E0106": "E0106 missing lifetime: a returned reference must borrow from an argument; return "
             "an owned String or Vec when unsure.",
    "E0277": "E0277 trait bound not satisfied: check the types on both sides; convert with "
             ".into() or `as`, or collect into the exact type required.",
    "E0282": "E0282 type annotations needed: name the target type of collect/parse, e.g. "
             ".collect::<Vec<_>>() or s.parse::<i64>().",
    "E0308": "E0308 mismatched types: make every branch and the final expression match the "
             "declared return type; convert explicitly where needed.",
    "E0369": "E0369 binary operator not defined for these types: dereference (*x) or convert both "
             "operands to the same type first.",
    "E0382": "E0382 use after move: borrow with & instead of moving, iterate with .iter(), or "
             ".clone() a value that is needed again.",
    "E0384": "E0384 assigned twice to an immutable variable: declare it with `let mut` when it "
             "changes.",
    "E0425": "E0425 unresolved name: use only the parameters, locals and items in scope, and "
             "declare each variable before its use.",
    "E0433": "E0433 unresolved path: import what you use (use std::collections::HashMap;) or "
             "write its full path.",
    "E0499": "E0499 two mutable borrows at once: finish with one &mut before taking another, or "
             "work through indices.",
    "E0502": "E0502 borrow conflict: do not mutate a collection while a reference into it is "
             "alive; copy the value out first.",
    "E0507": "E0507 cannot move out of a borrow: clone the value, or match on a reference and "
             "bind by ref.",
    "E0596": "E0596 cannot borrow as mutable: declare the binding with `let mut`, or take "
             "`&mut` where the value is owned.",
    "E0599": "E0599 no such method: call only methods the type has; iterator methods need "
             ".iter() or .chars() first.",
}
BRACES_LESSON = ("Unbalanced braces: write only the rest of the body and close the function "
                 "with exactly one `}`.")
COMPILE_LESSON = ("The code did not compile: use only the names and types of the signature and "
                  "std APIs you are sure exist.")
RUNTIME_LESSONS = {
    "timeout": "Runs timed out: make every loop advance toward its exit and every recursion "
               "reach a base case; no `loop` without `break`.",
    "memory": "Runs ran out of memory: do not grow collections without bound; check loop "
              "conditions and sizes before allocating.",
    "runtime_error": "Runs crashed (abort or stack overflow): avoid deep recursion on large "
                     "inputs; prefer iteration.",
}


def reward(result: RustResult) -> float:
    """1.0 when the tests pass, 0.5 when the code compiles but fails at run time, else 0.0.

    Partial credit for compiling separates "almost right" from "not Rust".
    """
    if result.passed:
        return 1.0
    return 0.5 if result.compiles else 0.0


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """(r - mean) / (std + eps) within one group: GRPO's critic-free advantage.

    A constant group gets exact zeros (no attempt did better than another).
    """
    if not rewards:
        raise ValueError("group_advantages needs at least one reward")
    if max(rewards) == min(rewards):
        return [0.0] * len(rewards)
    mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
    return [(r - mean) / (std + eps) for r in rewards]


def informative(rewards: Sequence[float]) -> bool:
    """Whether a group's rewards differ (max > min): only such groups are summarised.

    A group whose attempts all scored the same (all fail, all pass, or all compile and fail
    at 0.5) has all-zero advantages: nothing separates a good attempt from a bad one.
    """
    return max(rewards) > min(rewards)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One completion, its verifier result and its reward."""

    completion: str
    result: RustResult
    reward: float


def lessons_from(problem: Problem, rollouts: list[Rollout]) -> list[str]:
    """Candidate lessons from one graded group, most harmful cause first; [] when all passed.

    A cause is a rustc error code, a set of failing tests, a timeout or a crash; causes are
    ranked by the summed advantage of the rollouts showing them, then by how many show them.
    """
    advantages = group_advantages([r.reward for r in rollouts])
    passing = any(r.result.passed for r in rollouts)
    scores: dict[str, tuple[float, int]] = {}  # lesson -> (summed advantage, rollouts)
    for rollout, advantage in zip(rollouts, advantages, strict=True):
        for lesson in _lessons_for(problem, rollout.result, passing):
            total, count = scores.get(lesson, (0.0, 0))
            scores[lesson] = (total + advantage, count + 1)
    return sorted(scores, key=lambda lesson: (scores[lesson][0], -scores[lesson][1]))


def _lessons_for(problem: Problem, result: RustResult, passing: bool) -> list[str]:
    """The lessons one failed rollout teaches (none for a pass)."""
    if result.passed:
        return []
    if result.status == "compile_error":
        known = [ERROR_LESSONS[c] for c in result.error_codes if c in ERROR_LESSONS]
        return known or [BRACES_LESSON if _UNBALANCED.search(result.stderr) else COMPILE_LESSON]
    if result.status == "test_failure":
        return [_test_lesson(_failing_tests(problem, result.stderr), passing)]
    return [RUNTIME_LESSONS[result.status]]


def _failing_tests(problem: Problem, output: str) -> list[str]:
    """The failing libtest tests in `output` that are test functions of `problem`.

    Checking against the problem keeps text printed by generated code out of the library.
    """
    declared = set(_TEST_FN.findall(problem.tests))
    names = (name.rsplit("::", 1)[-1] for name in _FAILED_TEST.findall(output))
    return list(dict.fromkeys(name for name in names if name in declared))


def _test_lesson(names: list[str], passing: bool) -> str:
    """A lesson on tests failing after a clean build: names them when they fit in one line."""
    contrast = "; another attempt passed" if passing else ""
    text = (f"Tests failed after compiling{contrast}: check edge cases (empty, negative, bounds) "
            f"against the doc comment.")
    shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
    named = text.replace("Tests failed", f"Tests {shown} failed", 1)
    return named if names and len(named) <= MAX_LESSON_CHARS else text
