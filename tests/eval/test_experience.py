"""The experience library: add / modify / delete, caps, rendering, save and load."""

import json

import pytest

from nanochat_jax.errors import EvalError
from nanochat_jax.eval.experience import ExperienceLibrary
from nanochat_jax.eval.problems import BUILTIN_PROBLEMS, load_problems

BUILTIN = {p.task_id: p for p in load_problems(BUILTIN_PROBLEMS)}
SUM = BUILTIN["builtin/sum_even"]  # -> i64


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
