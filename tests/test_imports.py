"""Dependencies point one way (DESIGN.md, BUILD.md "Design notes"): each part of the package
imports only the parts before it in LAYERS, never `experiments`, and never inside a function.
The commands (`cli`) come last: they may import any part of the package."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "nanochat_jax")
# Each part may import the parts on earlier lines (and itself); parts on one line are
# unordered and do not import each other.
LAYERS = (("errors",), ("ternary",), ("collider",), ("model",), ("losses",), ("optim",),
          ("data",), ("train",), ("infer",), ("eval", "export"), ("cli",))
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules():
    """(dotted name, path) of every module of the package."""
    for directory, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                yield dotted.removesuffix(".__init__"), path


def _imports(path):
    """(imported module, line, whether at module level) of every import in a file."""
    tree = ast.parse(open(path).read())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in top


def _part(dotted: str) -> str | None:
    """The part of the package a dotted name belongs to (None: the package root)."""
    pieces = dotted.split(".")
    return pieces[1] if len(pieces) > 1 else None


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(name) for name, _ in _modules()} - {None}
    assert parts == set(RANK), parts ^ set(RANK)


@pytest.mark.parametrize("module, path", list(_modules()), ids=lambda x: str(x))
def test_imports_point_down_the_layers_at_module_level(module, path):
    own = _part(module)
    for name, line, at_top in _imports(path):
        where = f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
        assert not name.startswith("experiments"), f"{where}: the package never imports " \
                                                   f"experiments"
        if not name.startswith("nanochat_jax.") or own is None:
            continue
        target = _part(name)
        assert at_top, f"{where} inside a function: import it at the top of the module"
        if target != own:
            assert RANK[target] < RANK[own], (
                f"{where}: {own} is in layer {RANK[own]}, {target} in {RANK[target]}; a part "
                f"imports only earlier layers ({LAYERS})")


def test_the_check_catches_an_upward_and_a_function_local_import(tmp_path):
    bad = tmp_path / "nanochat_jax" / "model" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from nanochat_jax.train import trainer\n\n\ndef f():\n"
                   "    from nanochat_jax.errors import ConfigError\n")
    with pytest.raises(AssertionError, match="model is in layer 3, train in 7"):
        test_imports_point_down_the_layers_at_module_level("nanochat_jax.model.bad", str(bad))
    bad.write_text("def f():\n    from nanochat_jax.errors import ConfigError\n")
    with pytest.raises(AssertionError, match="inside a function"):
        test_imports_point_down_the_layers_at_module_level("nanochat_jax.model.bad", str(bad))
