"""Dependencies point one way (docs/design.md#dependencies-point-one-way): each part of the package
imports only the parts before it in LAYERS, never `experiments`, and never inside a function.
The commands (`cli`) come last: they may import any part of the package."""

import ast
import os
import subprocess
import sys

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


EXPERIMENTS = os.path.join(ROOT, "experiments")
# Within experiments/: configs/ (the run configs and their loading) imports no other part of
# experiments/, and no module imports the training command `experiments.run`.
COMMAND = "experiments.run"


def _experiment_modules():
    for directory, _, files in os.walk(EXPERIMENTS):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                yield os.path.relpath(path[:-3], ROOT).replace(os.sep, "."), path


def _check_experiment_imports(module: str, path: str) -> None:
    for name, line, _ in _imports(path):
        where = f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
        assert not (name == COMMAND or name.startswith(COMMAND + ".")), (
            f"{where}: the training command; load configs with experiments.configs.loading")
        if module.startswith("experiments.configs") and name.startswith("experiments."):
            assert name.startswith("experiments.configs"), (
                f"{where}: experiments/configs imports no other part of experiments/")


@pytest.mark.parametrize("module, path", list(_experiment_modules()), ids=lambda x: str(x))
def test_experiments_load_configs_from_configs_never_from_the_training_command(module, path):
    _check_experiment_imports(module, path)


def test_tests_never_import_the_training_command():
    tests = os.path.dirname(os.path.abspath(__file__))
    for directory, _, files in os.walk(tests):
        for name in (f for f in files if f.endswith(".py")):
            _check_experiment_imports("tests", os.path.join(directory, name))


def test_the_experiments_check_catches_a_script_importing_the_command(tmp_path):
    bad = tmp_path / "bench_bad.py"
    bad.write_text("from experiments.run import load_config\n")
    with pytest.raises(AssertionError, match="the training command"):
        _check_experiment_imports("experiments.bench_bad", str(bad))
    bad.write_text("from experiments import benchmark\n")
    with pytest.raises(AssertionError, match="configs imports no other part"):
        _check_experiment_imports("experiments.configs.bad", str(bad))


def test_importing_the_package_changes_no_environment_variable():
    """Importing any module sets nothing: libtpu's settings for a host without a TPU are set
    where libtpu starts (train/sharding.py `prepare_libtpu_without_tpu`), not at import. Run
    without them (the test session sets them), after JAX's own import."""
    settings = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "ALLOW_MULTIPLE_LIBTPU_LOAD")
    env = {k: v for k, v in os.environ.items() if k not in settings}
    code = ("import importlib, os, pkgutil\n"
            "import jax\n"
            "before = dict(os.environ)\n"
            "import nanochat_jax\n"
            "for m in pkgutil.walk_packages(nanochat_jax.__path__, 'nanochat_jax.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(set(os.environ.items()) ^ set(before.items())))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
