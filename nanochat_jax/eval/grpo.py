"""Training-free GRPO for Rust: a frozen model improves through lessons prepended to its prompts.

The command is `python -m nanochat_jax.cli.grpo`.

Training-Free Group Relative Policy Optimization (Tencent Youtu, 2025; SPECS §12) replaces
gradient steps with an experience library, a short numbered list of lessons ("[1]. ...")
prepended to every prompt. Each epoch, for each problem: roll out a group of G completions
(G = 5, temperature 0.7) with the library in the prompt, grade them with the verifier, and
distil at most one new lesson from each group whose rewards differ (max > min).

Our choices (SPECS §12, "for us"):

- Reward: the Rust verifier (`rust.run_tests`): 1.0 when the tests pass, 0.5 when the code
  compiles but fails, times out or crashes at run time, 0.0 when it does not compile.
- Rule-based summariser: the paper has the model summarise each trajectory and critique the
  group; a small model does that badly, so `lessons_from` builds lessons deterministically from
  the verifier's output: a table maps frequent rustc error codes to one-line fixes, failing
  libtest tests are named (and a passing attempt in the group is pointed out), timeouts and
  crashes get a lesson on loops and recursion. Causes are ranked by the summed group-relative
  advantage of the rollouts that show them, and a group proposes the first one that is not a
  near-duplicate of a library lesson (the library's `modify` is there for a model summariser).
- Caps: at most `max_items` lessons (16) and `max_chars` rendered characters (2048, ~512
  tokens); an add past a cap first evicts the lesson with the lowest win rate, oldest first
  among ties (an untried lesson's win rate is 0, so proven lessons outlive new ones).
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
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Sequence

from nanochat_jax.errors import EvalError
from nanochat_jax.eval.code import Generate
from nanochat_jax.eval.rust import Problem, RustResult, run_tests

Verify = Callable[[Problem, str], RustResult]

HEADER = "Lessons from earlier attempts:\n"
MAX_LESSON_CHARS = 160
SIMILARITY = 0.9  # difflib ratio at which two lessons count as the same lesson
OPERATIONS = ("add", "modify", "delete")
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

    SPECS §12: partial credit for compiling separates "almost right" from "not Rust".
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


def _normalise(text: str) -> str:
    """`text` on one line with single spaces: the form lessons are stored and compared in."""
    return " ".join(text.split())


@dataclasses.dataclass
class Experience:
    """One lesson: `uses` counts the problems whose prompt held it, `wins` sums their rewards."""

    id: int
    text: str
    uses: int = 0
    wins: float = 0.0  # a sum of group mean rewards

    @property
    def win_rate(self) -> float:
        """The mean reward of the problems it was used on; 0.0 before its first use."""
        return self.wins / self.uses if self.uses else 0.0


class UnknownLessonError(EvalError, KeyError):
    """A lesson id that the library does not hold."""

    __str__ = Exception.__str__  # KeyError's would quote the message


@dataclasses.dataclass
class ExperienceLibrary:
    """The ordered, capped list of lessons prepended to prompts, with a log of every change.

    `epoch` stamps the log entries; `next_id` keeps ids unique after deletions.
    """

    max_items: int = 16
    max_chars: int = 2048  # of the rendered list, ~512 tokens
    items: list[Experience] = dataclasses.field(default_factory=list)
    log: list[dict] = dataclasses.field(default_factory=list)
    epoch: int = 0
    next_id: int = 1

    def __post_init__(self):
        if self.max_items < 1 or self.max_chars < 1:
            raise ValueError(f"max_items={self.max_items} and max_chars={self.max_chars} must "
                             f"be positive")

    def add(self, text: str) -> int:
        """Append a lesson and return its id; the id of an identical lesson if there is one.

        Past a cap, the lowest-win-rate other lessons are evicted first.
        """
        text = self._fitting(text)
        for item in self.items:
            if item.text == text:
                return item.id
        item = Experience(self.next_id, text)
        self.next_id += 1
        self.items.append(item)
        self._record("add", item.id, text)
        self._enforce_caps(keep=item.id)
        return item.id

    def modify(self, id: int, text: str) -> None:
        """Replace a lesson's text, keeping its place and its credit."""
        item = self.get(id)
        item.text = self._fitting(text)
        self._record("modify", id, item.text)
        self._enforce_caps(keep=id)

    def delete(self, id: int, reason: str = "requested") -> None:
        """Remove a lesson; `reason` ("requested", "cap", "harmful") goes into the log."""
        item = self.get(id)
        self.items.remove(item)
        self._record("delete", id, item.text, reason=reason)

    def get(self, id: int) -> Experience:
        """The lesson with this id."""
        for item in self.items:
            if item.id == id:
                return item
        raise UnknownLessonError(f"no lesson with id {id} in the experience library (ids: "
                                 f"{[item.id for item in self.items]})")

    def similar(self, text: str) -> int | None:
        """The id of the first lesson nearly identical to `text` (difflib ratio >= SIMILARITY)."""
        text = _normalise(text)
        for item in self.items:
            if difflib.SequenceMatcher(None, item.text, text).ratio() >= SIMILARITY:
                return item.id
        return None

    def credit(self, ids: Iterable[int], mean_reward: float) -> None:
        """Credit the lessons that were in one problem's prompt with the group's mean reward."""
        for id in ids:
            item = self.get(id)
            item.uses += 1
            item.wins += mean_reward

    def render(self) -> str:
        """The lessons as "[1]. lesson" lines, numbered by position (not id)."""
        return "\n".join(f"[{n}]. {item.text}" for n, item in enumerate(self.items, 1))

    def prompt(self, problem_prompt: str) -> str:
        """`problem_prompt` after a header and the lessons; unchanged when there are none."""
        if not self.items:
            return problem_prompt
        return HEADER + self.render() + "\n\n" + problem_prompt

    def save(self, path: str | os.PathLike) -> None:
        """Write the library (caps, lessons, log) as JSON, replacing `path` atomically."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExperienceLibrary:
        """Read a library written by `save`."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            items = [Experience(**item) for item in data.pop("items")]
            return cls(items=items, **data)
        except FileNotFoundError:
            raise EvalError(f"experience library {path} does not exist") from None
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise EvalError(f"{path} is not an experience library written by "
                            f"ExperienceLibrary.save ({e})") from None

    def _fitting(self, text: str) -> str:
        """`text` normalised, if it is non-empty and fits `max_chars` on its own."""
        text = _normalise(text)
        if not text:
            raise ValueError("a lesson needs some text")
        if len(f"[1]. {text}") > self.max_chars:
            raise ValueError(f"a lesson of {len(text)} characters cannot fit "
                             f"max_chars={self.max_chars}")
        return text

    def _enforce_caps(self, keep: int) -> None:
        """Evict lessons other than `keep`, lowest win rate (then oldest) first, until both
        caps hold."""
        while len(self.items) > self.max_items or len(self.render()) > self.max_chars:
            victim = min((item for item in self.items if item.id != keep),
                         key=lambda item: item.win_rate)
            self.delete(victim.id, reason="cap")

    def _record(self, op: str, id: int, text: str, **extra) -> None:
        """Append one operation to the log."""
        self.log.append({"op": op, "id": id, "text": text, "epoch": self.epoch, **extra})


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

