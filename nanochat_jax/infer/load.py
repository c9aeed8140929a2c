"""A trained run as an inference model: config, Transformer, weights and tokenizer.

The tokenizer is the run's `WORKDIR/tokenizer.json` (the trainer writes it), or for runs made
before that, the one of the corpus the run was trained on; either way its identity must equal
the one recorded in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from nanochat_jax.data import corpus as corpus_lib
from nanochat_jax.data.pipeline import corpus_spec
from nanochat_jax.data.tokenizer import FILENAME, BPETokenizer
from nanochat_jax.errors import CheckpointError
from nanochat_jax.model.config import ModelConfig, from_run_config
from nanochat_jax.model.packed import pack_params
from nanochat_jax.model.params import unscan
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.train.checkpoint import load_run


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready for generation."""

    config: Any  # the run's ConfigDict
    cfg: ModelConfig
    model: Transformer
    variables: dict  # {'params': ...}, or with `packed` the I2 kernels (model/packed.py)
    tokenizer: BPETokenizer
    step: int


def load(workdir: str, step: int | None = None, *, packed: bool = False,
         ternary_product: str | None = None) -> Loaded:
    """Load `workdir`'s checkpoint at `step` (default: latest). `packed` converts the ternary
    kernels to 2-bit I2 once; `ternary_product` overrides how BitLinear computes (e.g.
    "fake_quant" for latent weights without repacking them every call). A run trained with
    `model.scan_layers` comes back unrolled (`params.unscan`)."""
    config, state, meta = load_run(workdir, step)
    cfg = from_run_config(config)
    if ternary_product is not None:
        cfg = dataclasses.replace(cfg, ternary_product=ternary_product)
    path = os.path.join(workdir, FILENAME)
    if os.path.exists(path):
        tokenizer = BPETokenizer.load(workdir)
    else:
        directory = config.data.corpus_dir or corpus_lib.default_dir(corpus_spec(config))
        if not os.path.exists(os.path.join(directory, corpus_lib.MANIFEST)):
            raise CheckpointError(f"{workdir} has no {FILENAME} and its corpus {directory} is "
                                  f"gone: rebuild the corpus with the run's data settings")
        tokenizer = corpus_lib.Corpus.open(directory).tokenizer
    if tokenizer.identity() != meta["data"]["tokenizer"]:
        raise CheckpointError(f"the tokenizer found for {workdir} is {tokenizer.identity()}, "
                              f"the run used {meta['data']['tokenizer']}")
    cfg, params = unscan(cfg, state.params)  # decoding and export read unrolled blocks
    variables = {"params": params}
    if packed:
        if not cfg.ternary:
            raise CheckpointError(f"{workdir} is a dense model: there are no ternary weights "
                                  "to pack")
        variables = pack_params(variables)
    return Loaded(config, cfg, Transformer(cfg), variables, tokenizer, meta["step"])
