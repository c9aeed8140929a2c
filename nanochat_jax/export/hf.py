"""Export a trained run as a model-hub directory, and load such a directory back.

The command is `python -m nanochat_jax.cli.export_hf`. With `--format=transformers`
(`export_transformers`) it writes a directory `transformers.AutoModelForCausalLM` loads as
`BitNetForCausalLM` (export/hf_bitnet.py; `--check` loads it back with the hf extra and
compares logits and greedy tokens with ours). The default, `--format=nanochat` (`export`), is
this module's own format:

DIR gets `model.safetensors` (the latent fp32 weights, named by their Flax path joined with
"/", e.g. `block_0/attn/q/kernel`, layout `[in, out]`), `config.json` (the architecture,
the whole run config, the step, the tokenizer's identity), `tokenizer.json` (HF
`tokenizers`), and a generated model card `README.md` (what was trained, on what data, with
which features and optimizer, and its last evaluation numbers). Ternary quantisation is
applied on the fly by the model, as in training; `load` rebuilds the Transformer and its
variables from DIR alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from nanochat_jax.data.tokenizer import FILENAME, BPETokenizer
from nanochat_jax.errors import CheckpointError
from nanochat_jax.export import hf_bitnet
from nanochat_jax.infer.load import load as load_run
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.params import path_names
from nanochat_jax.model.transformer import Transformer

FORMAT = "nanochat-jax"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def flatten(params: dict) -> dict[str, np.ndarray]:
    """{'block_0/attn/q/kernel': array, ...} of a params tree."""
    return {"/".join(path_names(path)): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The params tree of `flatten`'s output."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Write the hub directory of `workdir`'s checkpoint at `step` (default: latest)."""
    run = load_run(workdir, step)
    if os.path.exists(os.path.join(out, WEIGHTS)):
        raise CheckpointError(f"{out} already holds an export; choose another --out")
    os.makedirs(out, exist_ok=True)
    save_file(flatten(run.variables["params"]), os.path.join(out, WEIGHTS),
              metadata={"format": FORMAT, "layout": "flax [in, out]", "step": str(run.step)})
    config = {"format": FORMAT, "model": dataclasses.asdict(run.cfg), "step": run.step,
              "tokenizer": run.tokenizer.identity(), "run_config": run.config.to_dict()}
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=1)
    run.tokenizer.save(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        n_params = sum(a.size for a in jax.tree.leaves(run.variables["params"]))
        f.write(model_card(run.cfg, config, n_params, _last_evals(workdir, run.step)))
    return out


def load(directory: str) -> tuple[ModelConfig, dict, BPETokenizer]:
    """(architecture, {'params': ...}, tokenizer) of an exported directory."""
    path = os.path.join(directory, CONFIG)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} has no {CONFIG}: not a nanochat-jax export")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} export (format "
                              f"{config.get('format')!r})")
    cfg = ModelConfig(**config["model"])
    params = unflatten(load_file(os.path.join(directory, WEIGHTS)))
    expected = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 8), np.int32))["params"]

    def shapes(tree):
        return {"/".join(path_names(p)): tuple(leaf.shape)
                               for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want, got = shapes(expected), shapes(params)
    if want != got:
        raise CheckpointError(f"{directory}: the weights do not match the architecture in "
                              f"{CONFIG}: {_differences(want, got)}")
    tokenizer = BPETokenizer.load(directory)
    if tokenizer.identity() != config["tokenizer"]:
        raise CheckpointError(f"{directory}/{FILENAME} is not the tokenizer the model was "
                              f"trained with")
    return cfg, {"params": params}, tokenizer


def _differences(want: dict, got: dict) -> str:
    """The first few names missing, unexpected or of the wrong shape."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k} {got[k]} (want {want[k]})" for k in sorted(want) if k in got
             and got[k] != want[k]]
    return f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}"


def _last_evals(workdir: str, step: int) -> dict[str, float]:
    """The run's latest eval/* metrics at or before `step` (metrics.jsonl)."""
    found: dict[str, float] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("step", 0) <= step:
                    found.update({k: v for k, v in row.items() if k.startswith("eval/")})
    return found


def model_card(cfg: ModelConfig, config: dict[str, Any], n_params: int,
               evals: dict[str, float]) -> str:
    """A README.md for the hub directory, generated from the config and the evaluations."""
    run = config["run_config"]
    features = [name for name, on in (
        (f"multi-token prediction ({cfg.mtp_kind}, depth {cfg.mtp_depth})", cfg.mtp_depth),
        (f"LoopLM ({cfg.loops} loops, exit gate)", cfg.loops > 1),
        (f"mHC ({cfg.mhc_streams} residual streams)", cfg.mhc_streams),
        ("Collider token filtering in training", run.get("collider", {}).get("enabled")),
    ) if on] or ["none beyond the BitNet b1.58 block"]
    data, opt, train = run["data"], run["optimizer"], run["training"]
    lines = [
        "---", "library_name: nanochat-jax", "tags: [bitnet, ternary, jax, flax, rust]", "---",
        "", f"# {run['model']['preset']} {'ternary (BitNet b1.58)' if cfg.ternary else 'dense'}"
        f" language model, step {config['step']}", "",
        "Trained with nanochat-jax and exported by `python -m nanochat_jax.cli.export_hf`.", "",
        "## Model", "",
        f"- {n_params:,} parameters: d_model {cfg.d_model}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads ({cfg.n_kv_heads} KV), FFN {cfg.d_ff}, vocabulary "
        f"{cfg.vocab_size}, context {cfg.seq_len}",
        "- " + ("every linear layer in the blocks is ternary ({-1, 0, +1} x absmean scale) with "
                "int8 activations; the weights here are the latent fp32 ones, quantised on "
                "the fly" if cfg.ternary else "dense fp32 linear layers"),
        f"- features: {', '.join(features)}",
        f"- tied embeddings: {cfg.tie_embeddings}; RoPE theta {cfg.rope_theta:g}", "",
        "## Training", "",
        f"- data: `{data['source']}` ({data['vocab_size']}-id byte-level BPE, tokenizer sha256 "
        f"`{config['tokenizer']['sha256'][:16]}...`)",
        f"- {config['step']} steps of {data['batch_size']} x {cfg.seq_len} tokens "
        f"({config['step'] * data['batch_size'] * cfg.seq_len:,} tokens)",
        f"- optimizer `{opt['name']}`, peak LR {opt['lr']:g}, schedule `{opt['schedule']}`, "
        f"seed {train['seed']}", "",
        "## Evaluation", "",
    ]
    if evals:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(evals.items())]
    else:
        lines.append("No evaluation was logged for this run.")
    lines += ["", "## Use", "", "```python", "from nanochat_jax.export.hf import load",
              "from nanochat_jax.infer.engine import Engine, Generation",
              "from nanochat_jax.model.transformer import Transformer", "",
              "cfg, variables, tokenizer = load('.')",
              "engine = Engine(Transformer(cfg), variables)", "```", ""]
    return "\n".join(lines)


def export_transformers(workdir: str, out: str, mode: str = "online",
                        step: int | None = None, check: bool = False) -> dict | None:
    """Write `workdir`'s checkpoint as a transformers BitNet directory (export/hf_bitnet.py),
    saying on stdout what is left out; with `check`, load it through transformers and
    return `hf_bitnet.compare` on a short prompt."""
    run = load_run(workdir, step)
    hf_bitnet.check_exportable(run.cfg, mode)  # refuse before anything is written
    for part in hf_bitnet.write(out, run.cfg, run.variables["params"], run.tokenizer, mode):
        print(f"left out: {part}")
    if not check:
        return None
    ids = [run.tokenizer.bos_id] + run.tokenizer.encode("fn main() {\n    let").tolist()
    return hf_bitnet.compare(out, run.model, run.variables, ids)

