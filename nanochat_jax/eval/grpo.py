"""Training-free GRPO for Rust: a frozen model improves through lessons prepended to its prompts.

The command is `python -m nanochat_jax.cli.grpo`.

Training-Free Group Relative Policy Optimization (Tencent Youtu, 2025) replaces
gradient steps with an experience library, a short numbered list of lessons ("[1]. ...")
prepended to every prompt. Each epoch, for each problem: roll out a group of G completions
(G = 5, temperature 0.7) with the library in the prompt, grade them with the verifier, and
distil at most one new lesson from each group whose rewards differ (max > min).

Our choices (docs/techniques.md#training-free-grpo):

- Reward and lessons (lessons.py): the Rust verifier grades each rollout; lessons are built
  from its output by rules, not by the model, and a group proposes its top lesson that is
  not a near-duplicate of a library lesson.
- Caps (experience.py): at most 16 lessons and 2,048 rendered characters; an add past a cap
  evicts the lowest win rate first.
- Credit and A/B deletion: the library is frozen during an epoch, so each of its lessons was in
  every prompt: per problem it gets uses += 1 and wins += the group's mean reward. With
  `ab_test`, each problem is also rolled out G times without the library (unless the library
  is empty: then the rollouts already are library-free), and at the end of the epoch a lesson
  whose win rate is below that library-free mean reward is deleted as harmful. This A/B
  compares the library with no library; lessons differ only in the epochs they were present
  for. The epoch's new lessons are added after the deletions.

`generate(prompts, n, temperature)` returns n completions per prompt: the command uses
`eval.code.Sampler` over the inference engine. A completion continues the prompt (the rest of
a function body), so it is cut at the problem's stop strings and the brace closing the body
(`Problem.cut`), not extracted from a fence. The command saves the library after every epoch
and resumes from `--library` when the file exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import statistics
from collections.abc import Callable, Sequence

from nanochat_jax.errors import EvalError
from nanochat_jax.eval.code import Generate
from nanochat_jax.eval.experience import OPERATIONS, SIMILARITY, ExperienceLibrary
from nanochat_jax.eval.lessons import Rollout, informative, lessons_from, reward
from nanochat_jax.eval.problems import Problem
from nanochat_jax.eval.sandbox import RustResult, run_tests

Verify = Callable[[Problem, str], RustResult]


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """What one epoch measured, over all rollouts with the library in the prompt."""

    epoch: int
    mean_reward: float
    baseline_reward: float | None  # the mean reward without the library; None: not measured
    compile_rate: float
    pass_rate: float
    informative: int  # groups whose rewards differ (max > min)
    operations: dict[str, int]  # library operations this epoch, by kind
    library_size: int


def default_verify(problem: Problem, completion: str) -> RustResult:
    """Run the problem's tests on its prompt followed by the completion, cut at a stop string
    or the end of the function body (`Problem.cut`)."""
    return run_tests(problem.program(problem.cut(completion)), problem.tests)


def run_epoch(problems: Sequence[Problem], generate: Generate, library: ExperienceLibrary, *,
              group_size: int = 5, temperature: float = 0.7, epoch: int = 0,
              verify: Verify | None = None, ab_test: bool = True) -> EpochStats:
    """One pass of training-free GRPO over `problems`, updating `library` in place.

    Rolls out each problem, credits the library's lessons, then deletes harmful lessons (with
    `ab_test`) and adds the groups' proposals. Identical completions of a problem are verified
    once (verification is taken to be deterministic).
    """
    if not problems:
        raise EvalError("run_epoch needs at least one problem")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be at least 1")
    verify = functools.lru_cache(maxsize=None)(verify or default_verify)
    library.epoch = epoch
    log_start = len(library.log)
    used = [item.id for item in library.items]  # frozen until the end of the epoch
    measure = ab_test and bool(used)
    groups, baseline, proposals = [], [], []
    for n, problem in enumerate(problems, 1):
        prompts = [library.prompt(problem.prompt)] + ([problem.prompt] if measure else [])
        completions = _sample(generate, prompts, group_size, temperature)
        group = [_rollout(problem, c, verify) for c in completions[0]]
        rewards = [r.reward for r in group]
        library.credit(used, statistics.fmean(rewards))
        plain = [_rollout(problem, c, verify).reward for c in completions[1]] if measure else []
        lesson = _propose(problem, group, library, proposals) if informative(rewards) else None
        proposals += [lesson] if lesson else []
        groups.append(group)
        baseline += plain if used else rewards  # an empty library's rollouts are library-free
        print(_progress(epoch, n, len(problems), problem, group, plain, lesson), flush=True)
    if measure:
        _delete_harmful(library, used, statistics.fmean(baseline))
    for lesson in proposals:
        library.add(lesson)
    return _stats(epoch, groups, baseline, library, log_start)


def _stats(epoch: int, groups: list[list[Rollout]], baseline: list[float],
           library: ExperienceLibrary, log_start: int) -> EpochStats:
    """An epoch's numbers from its groups, its library-free rewards and the log since it began."""
    rollouts = [r for group in groups for r in group]
    return EpochStats(
        epoch=epoch,
        mean_reward=statistics.fmean(r.reward for r in rollouts),
        baseline_reward=statistics.fmean(baseline) if baseline else None,
        compile_rate=statistics.fmean(r.result.compiles for r in rollouts),
        pass_rate=statistics.fmean(r.result.passed for r in rollouts),
        informative=sum(informative([r.reward for r in group]) for group in groups),
        operations={op: sum(e["op"] == op for e in library.log[log_start:]) for op in OPERATIONS},
        library_size=len(library.items),
    )


def _sample(generate: Generate, prompts: list[str], n: int,
            temperature: float) -> list[list[str]]:
    """`generate`'s completions, checked to be n for each prompt."""
    completions = generate(prompts, n, temperature)
    counts = [len(c) for c in completions]
    if counts != [n] * len(prompts):
        raise EvalError(f"generate returned {counts} completions for {len(prompts)} prompts; "
                        f"expected {n} for each")
    return completions


def _rollout(problem: Problem, completion: str, verify: Verify) -> Rollout:
    """Verify and grade one completion."""
    result = verify(problem, completion)
    return Rollout(completion, result, reward(result))


def _propose(problem: Problem, group: list[Rollout], library: ExperienceLibrary,
             proposals: list[str]) -> str | None:
    """The group's one proposal: its top lesson not nearly identical to a library lesson or to
    an earlier proposal of this epoch."""
    for lesson in lessons_from(problem, group):
        taken = difflib.get_close_matches(lesson, proposals, 1, SIMILARITY)
        if library.similar(lesson) is None and not taken:
            return lesson
    return None


def _delete_harmful(library: ExperienceLibrary, used: list[int], baseline: float) -> None:
    """Delete the lessons used this epoch whose win rate is below the library-free reward (by
    more than float rounding: the two are sums of the same rewards in different orders)."""
    for id in used:
        rate = library.get(id).win_rate
        if rate < baseline and not math.isclose(rate, baseline):
            library.delete(id, reason="harmful")


def _progress(epoch: int, n: int, total: int, problem: Problem, group: list[Rollout],
              baseline: list[float], lesson: str | None) -> str:
    """One line per problem: rewards with (and without, when measured) the library, and any new
    lesson."""
    g = len(group)
    line = (f"epoch {epoch} [{n}/{total}] {problem.task_id}: reward "
            f"{statistics.fmean(r.reward for r in group):.2f}")
    if baseline:
        line += f" (no library {statistics.fmean(baseline):.2f})"
    line += (f", compiles {sum(r.result.compiles for r in group)}/{g}, "
             f"passes {sum(r.result.passed for r in group)}/{g}")
    return line + (f"; lesson: {lesson}" if lesson else "")
