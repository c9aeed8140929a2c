"""Training-free GRPO's loop: rollouts, credit, A/B deletion, new lessons per epoch."""

import pytest

from nanochat_jax.errors import EvalError
from nanochat_jax.eval.experience import HEADER, ExperienceLibrary
from nanochat_jax.eval.grpo import run_epoch
from nanochat_jax.eval.lessons import ERROR_LESSONS
from nanochat_jax.eval.problems import BUILTIN_PROBLEMS, load_problems
from nanochat_jax.eval.sandbox import rustc_available

needs_rustc = pytest.mark.skipif(
    not rustc_available(),
    reason="needs rustc (set $RUSTC or install rustup / apt-get install rustc)")

BUILTIN = {p.task_id: p for p in load_problems(BUILTIN_PROBLEMS)}
SUM = BUILTIN["builtin/sum_even"]  # -> i64
PAL = BUILTIN["builtin/is_palindrome"]
NEG = BUILTIN["builtin/first_negative"]  # -> Option<usize>
TYPE_ERROR = '    "none"\n}\n'  # E0308 in a function returning i64
MOVE_ERROR = "    let v = xs.to_vec();\n    let w = v;\n    v.iter().position(|&x| x < 0)\n}\n"


class FakeGenerator:
    """Canned completions per problem (found by the problem prompt a prompt ends with), from
    `with_library` when the prompt starts with the lessons header; records every prompt."""

    def __init__(self, canned: dict[str, list[str]],
                 with_library: dict[str, list[str]] | None = None):
        self.canned, self.with_library = canned, with_library or canned
        self.prompts: list[str] = []

    def __call__(self, prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        self.prompts += prompts
        return [self._completions(p)[:n] for p in prompts]

    def _completions(self, prompt: str) -> list[str]:
        table = self.with_library if prompt.startswith(HEADER) else self.canned
        return next(c for problem_prompt, c in table.items() if prompt.endswith(problem_prompt))


def test_generate_returning_the_wrong_number_of_completions_is_an_eval_error():
    with pytest.raises(EvalError, match=r"generate returned \[1\] completions"):
        run_epoch([SUM], lambda prompts, n, t: [["x"]], ExperienceLibrary(), group_size=3)


@needs_rustc
def test_two_epochs_learn_from_informative_groups_and_prompt_with_the_lessons(tmp_path, capsys):
    """sum_even: 2 of 3 pass (one after a stop string), 1 has E0308: informative. is_palindrome
    always passes and first_negative never compiles (E0382): neither is informative."""
    problems = [SUM, PAL, NEG]
    gen = FakeGenerator({
        SUM.prompt: [SUM.canonical_solution + "\nfn main() { junk", SUM.canonical_solution,
                     TYPE_ERROR],
        PAL.prompt: [PAL.canonical_solution] * 3,
        NEG.prompt: [MOVE_ERROR] * 3,
    })
    lib = ExperienceLibrary()
    first = run_epoch(problems, gen, lib, group_size=3, epoch=0)
    assert gen.prompts == [p.prompt for p in problems]  # empty library: no A/B rollouts
    assert first.mean_reward == pytest.approx(5 / 9)
    assert first.baseline_reward == pytest.approx(5 / 9)
    assert (first.compile_rate, first.pass_rate) == (pytest.approx(5 / 9), pytest.approx(5 / 9))
    assert first.informative == 1
    assert first.operations == {"add": 1, "modify": 0, "delete": 0}
    assert [item.text for item in lib.items] == [ERROR_LESSONS["E0308"]]
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # one line per problem

    lib.save(tmp_path / "lib.json")
    lib = ExperienceLibrary.load(tmp_path / "lib.json")
    gen.prompts.clear()
    second = run_epoch(problems, gen, lib, group_size=3, epoch=1)
    lessons = "Lessons from earlier attempts:\n[1]. " + ERROR_LESSONS["E0308"] + "\n\n"
    assert gen.prompts == [prompt for p in problems for prompt in (lessons + p.prompt, p.prompt)]
    assert second.baseline_reward == pytest.approx(5 / 9)
    [item] = lib.items  # the E0308 lesson: not added twice, not harmful (equals the baseline)
    assert (item.uses, item.wins) == (3, pytest.approx(5 / 3))
    assert second.operations == {"add": 0, "modify": 0, "delete": 0}


@needs_rustc
def test_a_lesson_that_lowers_the_reward_below_the_library_free_baseline_is_deleted():
    lib = ExperienceLibrary()
    lesson = lib.add("Return a string literal.")
    gen = FakeGenerator({SUM.prompt: [SUM.canonical_solution] * 2},
                        with_library={SUM.prompt: [TYPE_ERROR] * 2})
    stats = run_epoch([SUM], gen, lib, group_size=2, epoch=4)
    assert (stats.mean_reward, stats.baseline_reward) == (0.0, 1.0)
    assert lib.items == [] and stats.operations["delete"] == 1
    assert lib.log[-1] == {"op": "delete", "id": lesson, "text": "Return a string literal.",
                           "epoch": 4, "reason": "harmful"}


@needs_rustc
def test_without_ab_test_no_library_free_rollouts_are_drawn_and_nothing_is_deleted():
    lib = ExperienceLibrary()
    lib.add("Return a string literal.")
    gen = FakeGenerator({SUM.prompt: [SUM.canonical_solution] * 2},
                        with_library={SUM.prompt: [TYPE_ERROR] * 2})
    stats = run_epoch([SUM], gen, lib, group_size=2, ab_test=False)
    assert all(p.startswith(HEADER) for p in gen.prompts)
    assert stats.baseline_reward is None and len(lib.items) == 1
