"""The hub export round-trips: same weights, same generations, an honest model card."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from nanochat_jax.cli.export_hf import main
from nanochat_jax.errors import CheckpointError
from nanochat_jax.export.hf import export, flatten, load, unflatten
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.infer.load import load as load_run
from nanochat_jax.model.transformer import Transformer


def test_flatten_and_unflatten_are_inverse():
    tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros((2, 3))}}, "e": np.arange(3)}
    flat = flatten(tree)
    assert sorted(flat) == ["a/b", "a/c/d", "e"]
    assert jax.tree.all(jax.tree.map(np.array_equal, unflatten(flat), tree))


@pytest.mark.slow
def test_export_loads_back_to_the_same_model(trained_run, tmp_path, capsys):
    workdir, config, summary = trained_run
    out = tmp_path / "hub"
    main(["--checkpoint", workdir, "--out", str(out)])
    assert "model.safetensors" in capsys.readouterr().out
    cfg, variables, tokenizer = load(str(out))
    run = load_run(workdir)
    assert cfg == run.cfg and tokenizer.identity() == run.tokenizer.identity()
    assert jax.tree.all(jax.tree.map(np.array_equal, variables["params"],
                                     jax.tree.map(np.asarray, run.variables["params"])))
    prompt = [[tokenizer.bos_id] + tokenizer.encode("import os\n").tolist()]
    gen = Generation(max_new_tokens=8)
    assert (Engine(Transformer(cfg), variables).generate(prompt, gen).tokens
            == Engine(run.model, run.variables).generate(prompt, gen).tokens)
    card = (out / "README.md").read_text()
    assert f"| eval/bpb | {summary['eval/bpb']:.4f} |" in card
    assert "multi-token prediction (sequential, depth 1)" in card
    assert json.loads((out / "config.json").read_text())["step"] == config.training.steps
    with pytest.raises(CheckpointError, match="already holds an export"):
        export(workdir, str(out))


@pytest.mark.slow
def test_load_names_what_is_wrong_with_a_damaged_export(trained_run, tmp_path):
    out = tmp_path / "hub"
    export(trained_run[0], str(out))
    tensors = load_file(str(out / "model.safetensors"))
    tensors.pop("final_norm/scale")
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['final_norm/scale'\]"):
        load(str(out))
    with pytest.raises(CheckpointError, match="not a nanochat-jax export"):
        load(str(tmp_path))
