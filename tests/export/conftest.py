"""Shared by the export tests: a small Rust text and its tokenizer, and a model trained for a
moment on a repeating token cycle (decisive logits, so greedy output compares without
near-ties)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanochat_jax.data.tokenizer import train_tokenizer
from nanochat_jax.model.transformer import Transformer

RUST = ["fn main() {\n    let mut v: Vec<u32> = Vec::new();\n    v.push(1);\n}\n",
        "impl Default for Config {\n    fn default() -> Self {\n        Self { n: 0 }\n    }\n}\n",
        "pub struct Config {\n    pub n: usize,\n}\n// a comment with 'quotes' and 123\n"] * 20


@pytest.fixture(scope="session")
def rust_texts() -> list[str]:
    return RUST


@pytest.fixture(scope="session")
def tokenizer():
    """A 300-id byte-level BPE of the Rust texts."""
    return train_tokenizer(iter(RUST), 300)


def init_params(cfg, seed: int = 0) -> dict:
    """Freshly initialised params of the ModelConfig `cfg`, as numpy arrays."""
    params = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    return jax.tree.map(np.asarray, params["params"])


@pytest.fixture(scope="session")
def train_on_cycle(fit_adam):
    """`(cfg, cycle, steps=60) -> (model, params)`: `cfg` trained with Adam for `steps` steps
    on every rotation of the token `cycle` repeated, 32 next-token targets per row."""

    def train(cfg, cycle: list[int], steps: int = 60):
        model = Transformer(cfg)
        rows = np.stack([np.roll(np.tile(cycle, 40), -s)[:33] for s in range(len(cycle))])

        def loss(params):
            logits = model.apply({"params": params}, jnp.asarray(rows[:, :-1]))
            return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

        params = fit_adam(loss, init_params(cfg), steps, 3e-3)
        return model, jax.tree.map(np.asarray, params)

    return train

