"""The model zoo's sizes are the real ones and its commands train the preset they name."""

import json

import jax
import jax.numpy as jnp
import pytest

from experiments.configs.loading import load_config
from experiments.zoo import main, sizes, train_command
from nanochat_jax.model.config import PRESETS, model_config
from nanochat_jax.model.packed import pack_params, packed_bytes, ternary_weight_bytes
from nanochat_jax.model.transformer import Transformer, count_params


def test_sizes_equal_those_of_an_initialised_and_packed_model():
    cfg = model_config("tiny", vocab_size=384, seq_len=128)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    got = sizes(cfg)
    assert got["params"] == count_params(cfg)["total"]
    assert got["ternary_packed_bytes"] == packed_bytes(pack_params(params))
    assert got["ternary_bf16_bytes"] == ternary_weight_bytes(params)


def test_each_train_command_builds_the_config_of_its_preset():
    for name in PRESETS:
        flags = dict(f.removeprefix("--").split("=") for f in train_command(name).split()[3:])
        config = load_config(flags['config'])
        assert flags.get("config.model.preset", config.model.preset) == name


@pytest.mark.slow
def test_zoo_lists_every_preset_with_its_command(capsys):
    main(["--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["preset"] for r in rows] == list(PRESETS)
    assert rows[0]["train"] == train_command(rows[0]["preset"])
