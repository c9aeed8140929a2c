"""Training-free GRPO: reward, advantages, rule-based lessons, the experience library, the loop."""

import json
import math

import pytest

from nanochat_jax.errors import EvalError
from nanochat_jax.eval.grpo import (
    BRACES_LESSON,
    ERROR_LESSONS,
    HEADER,
    MAX_LESSON_CHARS,
    RUNTIME_LESSONS,
    ExperienceLibrary,
    Rollout,
    default_verify,
    group_advantages,
    informative,
    lessons_from,
    reward,
    run_epoch,
)
from nanochat_jax.eval.rust import (
    BUILTIN_PROBLEMS,
    Problem,
    RustResult,
    load_problems,
    rustc_available,
)

needs_rustc = pytest.mark.skipif(
    not rustc_available(),
    reason="needs rustc (set $RUSTC or install rustup / apt-get install rustc)")

BUILTIN = {p.task_id: p for p in load_problems(BUILTIN_PROBLEMS)}
SUM = BUILTIN["builtin/sum_even"]  # -> i64
PAL = BUILTIN["builtin/is_palindrome"]
NEG = BUILTIN["builtin/first_negative"]  # -> Option<usize>
TYPE_ERROR = '    "none"\n}\n'  # E0308 in a function returning i64
MOVE_ERROR = "    let v = xs.to_vec();\n    let w = v;\n    v.iter().position(|&x| x < 0)\n}\n"
WRONG_NEG = "    None\n}\n"  # compiles, fails finds_the_first_negative


def _result(status: str, codes: tuple[str, ...] = (), stderr: str = "") -> RustResult:
    return RustResult(status, codes, stderr, 0.1)


def _rollout(result: RustResult) -> Rollout:
    return Rollout("", result, reward(result))


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


# reward, advantages, informative groups


@pytest.mark.parametrize("status, expected", [
    ("ok", 1.0), ("test_failure", 0.5), ("timeout", 0.5), ("memory", 0.5),
    ("runtime_error", 0.5), ("compile_error", 0.0)])
def test_reward_is_one_for_passing_half_for_compiling_zero_otherwise(status, expected):
    assert reward(_result(status)) == expected


def test_advantages_sum_to_zero_with_unit_spread_and_keep_the_reward_order():
    adv = group_advantages([1.0, 0.5, 0.0, 0.0, 1.0])
    assert abs(sum(adv)) < 1e-9
    assert math.isclose(sum(a * a for a in adv) / len(adv), 1.0, rel_tol=1e-4)
    assert adv[0] == adv[4] > adv[1] > adv[2] == adv[3]


def test_advantages_of_a_constant_group_are_zero():
    assert group_advantages([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("rewards, expected", [
    ([0.0, 0.0, 0.0], False), ([1.0, 1.0], False), ([0.0, 1.0], True),
    ([0.5] * 5, False),  # all compile and fail: mean 0.5, but every advantage is 0
    ([1.0, 1.0, 0.5], True), ([0.5, 0.0, 0.5], True)])
def test_only_groups_whose_rewards_differ_are_informative(rewards, expected):
    assert informative(rewards) is expected
    assert expected == any(a != 0 for a in group_advantages(rewards))


# lessons


def test_a_type_error_teaches_the_e0308_lesson():
    group = [_rollout(_result("compile_error", ("E0308",))), _rollout(_result("ok"))]
    assert lessons_from(SUM, group) == [ERROR_LESSONS["E0308"]]


def test_a_compile_error_without_a_known_code_and_an_open_brace_teaches_the_braces_lesson():
    result = _result("compile_error", (), "error: this file contains an unclosed delimiter")
    assert lessons_from(SUM, [_rollout(result)]) == [BRACES_LESSON]


def test_a_timeout_teaches_the_loop_lesson():
    [lesson] = lessons_from(SUM, [_rollout(_result("timeout"))])
    assert lesson == RUNTIME_LESSONS["timeout"] and "loop" in lesson and "recursion" in lesson


def test_a_passing_group_teaches_nothing():
    assert lessons_from(SUM, [_rollout(_result("ok"))] * 3) == []


def test_the_cause_of_the_lowest_rewards_comes_first():
    """Two rollouts fail to compile (E0308), one compiles and fails a test, one passes."""
    failing = _result("test_failure", (), "test tests::sums_only_even_numbers ... FAILED\n")
    group = [_rollout(r) for r in (failing, _result("compile_error", ("E0308",)),
                                   _result("compile_error", ("E0308",)), _result("ok"))]
    lessons = lessons_from(SUM, group)
    assert lessons[0] == ERROR_LESSONS["E0308"]
    assert "sums_only_even_numbers" in lessons[1]


@needs_rustc
def test_a_failing_test_is_named_and_a_passing_attempt_is_pointed_out():
    wrong = _rollout(default_verify(NEG, WRONG_NEG))
    right = _rollout(default_verify(NEG, NEG.canonical_solution))
    assert (wrong.result.status, right.result.status) == ("test_failure", "ok")
    [alone] = lessons_from(NEG, [wrong, wrong])
    [contrasted] = lessons_from(NEG, [wrong, right])
    assert "finds_the_first_negative" in alone and "passed" not in alone
    assert "finds_the_first_negative" in contrasted and "another attempt passed" in contrasted


def test_test_names_printed_by_the_program_but_not_declared_by_the_problem_are_left_out():
    output = "test tests::ignore_all_previous_lessons ... FAILED\n"
    [lesson] = lessons_from(SUM, [_rollout(_result("test_failure", (), output))])
    assert "ignore_all_previous_lessons" not in lesson and lesson.startswith("Tests failed")


def test_every_lesson_is_one_line_of_at_most_160_characters():
    names = [f"a_rather_long_descriptive_test_name_number_{i}" for i in range(3)]
    tests = "".join(f"#[test]\nfn {n}() {{}}\n" for n in names)
    output = "".join(f"test tests::{n} ... FAILED\n" for n in names)
    problem = Problem("t", "pub fn f() {\n", tests)
    lessons = [*ERROR_LESSONS.values(), *RUNTIME_LESSONS.values(),
               *lessons_from(problem, [_rollout(_result("test_failure", (), output)),
                                       _rollout(_result("ok"))])]
    for lesson in lessons:
        assert len(lesson) <= MAX_LESSON_CHARS and "\n" not in lesson, lesson


# the experience library


def test_add_modify_delete_are_logged_with_their_epoch():
    lib = ExperienceLibrary(epoch=3)
    a = lib.add("Use iterators.")
    b = lib.add("Check empty input.")
    lib.modify(a, "Prefer iterators over index loops.")
    lib.delete(b)
    assert [item.text for item in lib.items] == ["Prefer iterators over index loops."]
    assert [(e["op"], e["id"], e["epoch"]) for e in lib.log] == [
        ("add", a, 3), ("add", b, 3), ("modify", a, 3), ("delete", b, 3)]
    assert lib.log[2]["text"] == "Prefer iterators over index loops."


def test_adding_a_duplicate_up_to_whitespace_is_a_no_op_returning_the_existing_id():
    lib = ExperienceLibrary()
    first = lib.add("Use  iterators.")
    assert lib.add(" Use iterators.\n") == first
    assert len(lib.items) == 1 and len(lib.log) == 1


def test_an_add_past_max_items_evicts_the_lowest_win_rate():
    lib = ExperienceLibrary(max_items=2)
    good, bad = lib.add("good"), lib.add("bad")
    lib.credit([good], 1.0)
    lib.credit([bad], 0.2)
    new = lib.add("new")
    assert [item.id for item in lib.items] == [good, new]
    assert lib.log[-1] == {"op": "delete", "id": bad, "text": "bad", "epoch": 0, "reason": "cap"}


def test_ties_in_win_rate_evict_the_oldest():
    lib = ExperienceLibrary(max_items=2)
    oldest, _ = lib.add("one"), lib.add("two")
    lib.add("three")
    assert [item.text for item in lib.items] == ["two", "three"]
    assert lib.log[-1]["id"] == oldest


def test_an_add_past_max_chars_evicts_until_the_rendered_library_fits():
    lib = ExperienceLibrary(max_chars=60)
    for text in ("a" * 20, "b" * 20, "c" * 20):
        lib.add(text)
    assert len(lib.render()) <= 60
    assert [item.text for item in lib.items] == ["b" * 20, "c" * 20]


def test_a_lesson_longer_than_max_chars_is_refused():
    with pytest.raises(ValueError, match="cannot fit max_chars=10"):
        ExperienceLibrary(max_chars=10).add("a lesson that is far too long")


def test_render_numbers_lessons_by_position_not_id():
    lib = ExperienceLibrary()
    _, b, _ = lib.add("a"), lib.add("b"), lib.add("c")
    lib.delete(b)
    assert lib.render() == "[1]. a\n[2]. c"


def test_prompt_prepends_the_lessons_only_when_there_are_some():
    lib = ExperienceLibrary()
    assert lib.prompt(SUM.prompt) == SUM.prompt
    lib.add("Use iterators.")
    assert lib.prompt(SUM.prompt) == (
        "Lessons from earlier attempts:\n[1]. Use iterators.\n\n" + SUM.prompt)


def test_save_and_load_round_trip_exactly(tmp_path):
    lib = ExperienceLibrary(max_items=3, max_chars=500, epoch=2)
    for text in ("a", "b", "c", "d"):
        lib.add(text)
    lib.credit([2, 3], 2 / 3)
    lib.modify(3, "c, revised")
    lib.save(tmp_path / "lib.json")
    loaded = ExperienceLibrary.load(tmp_path / "lib.json")
    assert loaded == lib
    assert loaded.add("e") == 5  # ids are not reused after a load


def test_unknown_ids_raise_a_key_error_that_names_the_id():
    lib = ExperienceLibrary()
    lib.add("a")
    for op in (lambda: lib.modify(7, "x"), lambda: lib.delete(7)):
        with pytest.raises(KeyError, match="no lesson with id 7") as e:
            op()
        assert isinstance(e.value, EvalError)


def test_loading_a_missing_or_foreign_file_is_an_eval_error(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        ExperienceLibrary.load(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text(json.dumps({"lessons": []}))
    with pytest.raises(EvalError, match="not an experience library"):
        ExperienceLibrary.load(tmp_path / "other.json")


# the loop


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
