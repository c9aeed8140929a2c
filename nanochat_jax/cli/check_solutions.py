"""Build and test every problem's canonical solution against its tests.

    python -m nanochat_jax.cli.check_solutions [--problems=PATH]

tests the builtin set by default, prints a row per problem, and exits non-zero if one
fails: how `KNOWN_BROKEN` in eval/problems.py was found.
"""

from __future__ import annotations

import argparse
import sys

from nanochat_jax.errors import EvalError
from nanochat_jax.eval.problems import PROBLEM_SETS, Problem, load_problems
from nanochat_jax.eval.sandbox import network_isolation, run_tests, rustc_version


def check_solutions(problems: list[Problem], timeout: float) -> bool:
    """Test every canonical solution, printing a row per problem; True when all pass."""
    width = max(len("task_id"), *(len(p.task_id) for p in problems))
    print(f"{'task_id':<{width}}  {'status':<13}  seconds", flush=True)
    failures, skipped = [], 0
    for p in problems:
        if p.canonical_solution is None:
            skipped += 1
            print(f"{p.task_id:<{width}}  {'(no solution)':<13}", flush=True)
            continue
        r = run_tests(p.program(p.canonical_solution), p.tests, timeout=timeout)
        print(f"{p.task_id:<{width}}  {r.status:<13}  {r.seconds:7.2f}", flush=True)
        if not r.passed:
            failures.append((p, r))
    for p, r in failures:
        print(f"\n--- {p.task_id}: {r.status} ---\n{r.stderr}")
    checked = len(problems) - skipped
    print(f"\n{checked - len(failures)}/{checked} canonical solutions pass"
          + (f" ({skipped} problems without one skipped)" if skipped else ""))
    return not failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat_jax.cli.check_solutions",
                                description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="builtin",
                   help=f"JSONL problem file or a set's name ({', '.join(PROBLEM_SETS)})")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per build and per run")
    a = p.parse_args(argv)
    try:
        problems = load_problems(a.problems, say=print)
        print(f"{len(problems)} problems from {a.problems}; {rustc_version()}; "
              f"{network_isolation()}", flush=True)
        return 0 if check_solutions(problems, a.timeout) else 1
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
