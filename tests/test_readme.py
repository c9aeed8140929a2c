"""The README's library example runs as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_python_example_trains_one_step():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "README lost its python example"
    scope: dict = {}
    exec(blocks[0], scope)  # noqa: S102 - the documented snippet itself is under test
    assert 5.0 < float(scope["loss_fn"](scope["params"])) < 6.5  # ~ln(384) after one step
