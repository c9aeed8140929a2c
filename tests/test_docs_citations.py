"""The repository cites only itself: every `docs/<name>.md#<heading>` in the code, the tests and
the docs names a file of the repository and a heading of that file, and nothing refers to
the developers' design and specification notes, which live outside it."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("nanochat_jax", "experiments", "tests", "docs", "BUILD.md", "README.md")
SUFFIXES = (".py", ".md", ".sh", ".toml", ".cc")
CITATION = re.compile(r"\b(?:docs/[\w./-]+?\.md|BUILD\.md|README\.md)(?:#([\w-]+))?")
# A section cited by its title in quotes (BUILD.md, then the title quoted): unchecked, so
# not a form the repository uses.
QUOTED = re.compile(r"\b(?:BUILD|README)\.md \"")
# The outside documents, as the code used to cite them (a name and a section number), spelled
# so that this file does not match itself.
OUTSIDE = re.compile(r"\bS[P]ECS\b|\bD[E]SIGN\.md\b|\bD[E]SIGN principle")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than `-` and `_` dropped,
    spaces to hyphens (`One value, one place` -> `one-value-one-place`)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """The anchors of a markdown file's headings (outside code fences); a repeated heading's
    later anchors get GitHub's `-1`, `-2`, ... suffixes."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in open(path, encoding="utf-8"):
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def files() -> list[str]:
    """Every scanned file, relative to the repository root."""
    out = []
    for entry in SCANNED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            out.append(entry)
            continue
        for directory, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            out += [os.path.relpath(os.path.join(directory, n), ROOT) for n in sorted(names)
                    if n.endswith(SUFFIXES)]
    return sorted(out)


def citation_problems(path: str, root: str = ROOT) -> list[str]:
    """`file:line: docs/...` for each citation in the file at `path` whose document is not in
    the repository at `root` or has no heading with the cited anchor."""
    problems = []
    name = os.path.relpath(path, root)
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        for match in CITATION.finditer(line):
            doc = match.group(0).split("#")[0]
            target = os.path.join(root, doc)
            if not os.path.isfile(target):
                problems.append(f"{name}:{number}: {match.group(0)}: no file {doc}")
            elif match.group(1) and match.group(1) not in anchors(target):
                problems.append(f"{name}:{number}: {match.group(0)}: {doc} has no heading "
                                f"#{match.group(1)} (it has: {', '.join(sorted(anchors(target)))})")
    return problems


def outside_references(path: str, root: str = ROOT) -> list[str]:
    """`file:line: text` for each reference to a document outside the repository."""
    return [f"{os.path.relpath(path, root)}:{number}: {line.strip()}"
            for number, line in enumerate(open(path, encoding="utf-8"), 1)
            if OUTSIDE.search(line) or QUOTED.search(line)]


def test_the_docs_that_code_cites_exist():
    for doc in ("docs/design.md", "docs/techniques.md"):
        assert os.path.isfile(os.path.join(ROOT, doc)), doc


def test_every_citation_names_a_file_and_a_heading_of_it():
    problems = [p for f in files() for p in citation_problems(os.path.join(ROOT, f))]
    assert not problems, "\n".join(problems)


def test_nothing_refers_to_documents_outside_the_repository():
    """A reference reads `docs/techniques.md#fire` (or another doc of the repository), not a
    section number of notes that readers of the repository do not have."""
    problems = [p for f in files() for p in outside_references(os.path.join(ROOT, f))]
    assert not problems, "\n".join(problems)


def test_the_citations_reach_both_docs():
    """The code cites design.md and techniques.md, so the scan finds what it must check."""
    cited = {m.group(0).split("#")[0] for f in files() if f.startswith("nanochat_jax")
             for line in open(os.path.join(ROOT, f), encoding="utf-8")
             for m in CITATION.finditer(line)}
    assert {"docs/design.md", "docs/techniques.md"} <= cited, cited


@pytest.mark.parametrize("doc", ["docs/design.md", "docs/techniques.md"])
def test_every_file_the_docs_name_exists(doc):
    """A module the docs point to (`model/hyper.py`, package-relative, or
    `experiments/compile.py`) is there: a move or rename shows here, not to a reader."""
    named = re.findall(r"`([\w/]+\.(?:py|md|cc|sh))`", open(os.path.join(ROOT, doc)).read())
    missing = [n for n in named if not any(os.path.isfile(os.path.join(ROOT, base, n))
                                           for base in ("", "nanochat_jax"))]
    assert named and not missing, missing


@pytest.mark.parametrize("heading, anchor", [
    ("GaLore 2", "galore-2"), ("8-bit optimizer states", "8-bit-optimizer-states"),
    ("Training-free GRPO", "training-free-grpo"), ("One value, one place", "one-value-one-place"),
    ("The `bitnet` arch (llama.cpp)", "the-bitnet-arch-llamacpp"), ("mHC", "mhc"),
])
def test_the_anchor_of_a_heading_is_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_the_checks_catch_a_missing_section_a_missing_file_and_an_outside_reference(tmp_path):
    docs = "docs" + "/"  # joined here, so the scan of this file does not see these citations
    outside = "SP" + "ECS"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("# Notes\n\n## FIRE\n\n```\n# not a heading\n"
                                                "```\n## FIRE\n")
    code = tmp_path / "module.py"
    code.write_text(f"# ({docs}notes.md#fire) and ({docs}notes.md#fire-1) are headings\n"
                    f"# ({docs}notes.md#not-a-heading) is inside a fence\n"
                    f"x = 1  # {docs}notes.md#muon is not a heading\n"
                    f"# {docs}missing.md names no file\n"
                    f"# {outside} §7 is a document this repository does not have\n")
    problems = citation_problems(str(code), root=str(tmp_path))
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in problems] == ["2", "3", "4"], problems
    assert f"{docs}notes.md has no heading #muon" in problems[1]
    assert f"no file {docs}missing.md" in problems[2]
    assert outside_references(str(code), root=str(tmp_path)) == [
        f"module.py:5: # {outside} §7 is a document this repository does not have"]
    quoted = tmp_path / "quoted.py"
    quoted.write_text("# see " + "BUILD.md" + ' "Faults"\n# see ' + "BUILD.md" + "#faults\n")
    (tmp_path / "BUILD.md").write_text("# Build\n\n## Faults\n")
    assert outside_references(str(quoted), root=str(tmp_path)) == [
        "quoted.py:1: # see " + "BUILD.md" + ' "Faults"']
    assert citation_problems(str(quoted), root=str(tmp_path)) == []
