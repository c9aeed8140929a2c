"""The model zoo: every preset with its size, its packed ternary weight memory, and the run
that trains it.

    python -m experiments.zoo [--json]

Sizes are those of the model the listed command trains (its config decides vocabulary and
tied head), from `jax.eval_shape` (shapes only, nothing allocated): parameters, the bytes of
the ternary layers as bf16 and as packed I2 codes (2 bits per weight, padded to the kernel's
tile alignment, plus one fp32 scale per matrix, exactly what `model.packed.pack_params`
stores), and the embedding and head, which stay in floating point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from experiments.configs.loading import load_config
from nanochat_jax.model.config import PRESETS, ModelConfig, from_run_config
from nanochat_jax.model.params import is_hidden
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary.packing import pack

# The experiment config (experiments/configs/) that trains each preset: `tiny` and `tiny256`
# (tied, SwiGLU: the llama.cpp-exportable tiny Rust model) have their own, every other
# preset is the `base` run (125m, rust-src, 32k BPE) with the preset swapped in.
TRAINED_BY = {"tiny": "tiny", "tiny256": "tiny:rust,gguf"}


def _run_config(preset: str):
    name = TRAINED_BY.get(preset, "base")
    return name, load_config(name)


def train_command(preset: str) -> str:
    """The runner command that trains `preset`."""
    name, config = _run_config(preset)
    swap = "" if config.model.preset == preset else f" --config.model.preset={preset}"
    return f"python -m experiments.run --config={name}{swap}"


def trained_model(preset: str) -> ModelConfig:
    """The architecture `train_command(preset)` trains."""
    _, config = _run_config(preset)
    config.model.preset = preset
    return from_run_config(config.to_dict())


def sizes(cfg: ModelConfig) -> dict[str, int]:
    """Parameter and weight-memory counts of one architecture (nothing is allocated). Shapes
    come from the scanned twin (the blocks' kernels stacked [n_layers, in, out], each layer
    packed on its own): one block is traced, not n_layers."""
    twin = Transformer(dataclasses.replace(cfg, scan_layers=True))
    shapes = jax.eval_shape(twin.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    kernels = [leaf for path, leaf in leaves if is_hidden(path, leaf)]
    packed = 0
    for k in kernels:
        p = jax.eval_shape(pack if k.ndim == 2 else jax.vmap(pack), k)
        packed += p.codes.size * p.codes.dtype.itemsize + p.scale.size * 4
    ternary = sum(k.size for k in kernels)
    total = sum(leaf.size for _, leaf in leaves)
    return {"params": total, "ternary_params": ternary, "other_params": total - ternary,
            "ternary_bf16_bytes": 2 * ternary, "ternary_packed_bytes": packed}


def zoo() -> list[dict]:
    """One row per preset: geometry, sizes and the command that trains it."""
    rows = []
    for name in PRESETS:
        cfg = trained_model(name)
        rows.append({"preset": name, "d_model": cfg.d_model, "layers": cfg.n_layers,
                     "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "d_ff": cfg.d_ff,
                     "vocab": cfg.vocab_size, "tied": cfg.tie_embeddings, **sizes(cfg),
                     "train": train_command(name)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = zoo()
    if args.json:
        print(json.dumps(rows, indent=1))
        return

    def mib(n):
        return f"{n / 2**20:,.1f}"

    print("| preset | d_model | layers | heads (kv) | d_ff | vocab | params | ternary params | "
          "ternary MiB bf16 | packed MiB | other MiB fp32 | trained by |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['d_model']} | {r['layers']} | {r['heads']} "
              f"({r['kv_heads']}) | {r['d_ff']} | {r['vocab']} | {r['params']:,} | "
              f"{r['ternary_params']:,} | {mib(r['ternary_bf16_bytes'])} | "
              f"{mib(r['ternary_packed_bytes'])} | {mib(4 * r['other_params'])} | "
              f"`{r['train']}` |")


if __name__ == "__main__":
    main()
