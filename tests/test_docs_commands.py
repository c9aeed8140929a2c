"""Every command the README and BUILD.md show names a module that exists, and every runner
command's config, variants and overrides resolve (checked without running them: the
commands themselves are exercised by the tests of each module)."""

import importlib.util
import os
import re

import pytest

from experiments.configs.loading import check_overrides_of, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "BUILD.md")


def _commands():
    """(doc, line, text) of every `python -m MODULE ...` in the docs, continuation lines
    joined."""
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read().replace("\\\n", " ")
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith("$ "):
                continue  # a shown session (the README's refused override), not a recipe
            for match in re.finditer(r"python -m ([\w.]+)([^`|#]*)", line):
                yield doc, number, match.group(1), match.group(2)


COMMANDS = list(_commands())


def test_the_docs_show_commands():
    modules = {module for _, _, module, _ in COMMANDS}
    assert {"experiments.run", "nanochat_jax.cli.export_gguf", "nanochat_jax.cli.eval"} <= modules


@pytest.mark.parametrize("module", sorted({m for _, _, m, _ in COMMANDS}))
def test_every_module_a_doc_runs_exists(module):
    """...and is a command: the package's commands live in nanochat_jax.cli, and a command
    module runs as `__main__` (a library module that lost its argparse is no command)."""
    where = f"{module} (in {', '.join(f'{d}:{n}' for d, n, m, _ in COMMANDS if m == module)})"
    spec = importlib.util.find_spec(module)
    assert spec is not None, where
    if spec.submodule_search_locations:  # a package: python -m runs its __main__
        spec = importlib.util.find_spec(module + ".__main__")
        assert spec is not None, where
    else:
        assert 'if __name__ == "__main__":' in open(spec.origin).read(), where
    assert not module.startswith("nanochat_jax.") or module.startswith("nanochat_jax.cli."), \
        where


@pytest.mark.parametrize("doc, line, arguments",
                         [(d, n, a) for d, n, m, a in COMMANDS if m == "experiments.run"])
def test_every_runner_command_names_a_config_and_fields_that_exist(doc, line, arguments):
    words = arguments.split()
    names = [w.split("=", 1)[1] for w in words if w.startswith("--config=")]
    if not names or any(c in names[0] for c in "{}[]<>") or names[0] in ("NAME",):
        return  # a template (NAME, {a,b}), not a command
    config = load_config(names[0])
    overrides = [w for w in words if w.startswith("--config.") and "{" not in w
                 and not w.startswith("--config.GROUP")]
    check_overrides_of(config, overrides)
