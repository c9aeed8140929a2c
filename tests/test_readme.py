"""The README's library example runs as written."""

import os
import re

import jax
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_example_trains_one_step():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "README lost its python example"
    scope: dict = {}
    exec(blocks[0], scope)  # noqa: S102 - the documented snippet itself is under test
    loss = jax.jit(scope["loss_fn"])(scope["params"])
    assert 5.0 < float(loss) < 6.5  # ~ln(384) after one step


@pytest.mark.slow
def test_readme_setup_and_hook_example_trains_and_calls_the_hook(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    example = next(b for b in blocks if "setup(" in b)
    scope: dict = {}
    exec(blocks[0], scope)  # noqa: S102 - the example's tokens
    exec(example.replace('"runs/mine"', repr(str(tmp_path))), scope)  # noqa: S102
    assert float(scope["metrics"]["loss/total"]) > 0
    assert scope["seen"] == [10, 20]


@pytest.mark.slow
def test_readme_generation_example_runs_on_a_trained_checkpoint(trained_run):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    example = next(b for b in blocks if "Engine(" in b)
    scope: dict = {}
    exec(example.replace('"runs/tiny_rust"', repr(trained_run[0])), scope)  # noqa: S102
    assert len(scope["out"].tokens) == 8 and all(len(t) <= 64 for t in scope["out"].tokens)
