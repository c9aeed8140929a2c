"""Validation bits per byte of a trained run, on the corpus it was trained on.

    python -m nanochat_jax.eval.bpb --checkpoint=WORKDIR [--step=N] [--batches=N]

Rebuilds the model from the config saved with the checkpoint, opens (or rebuilds) the same
corpus, checks the tokenizer is the one the run used, and evaluates the validation split
with the trainer's own eval step (so the number matches the run's `eval/bpb`).
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp

from nanochat_jax.data.pipeline import open_data
from nanochat_jax.errors import CheckpointError
from nanochat_jax.infer.load import add_checkpoint_flags
from nanochat_jax.model.config import from_run_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.train.checkpoint import load_run
from nanochat_jax.train.step import make_eval_step
from nanochat_jax.train.trainer import evaluate


def evaluate_bpb(workdir: str, step: int | None = None, batches: int | None = None
                 ) -> dict[str, float]:
    """{'eval/ce', 'eval/bpb', 'step', 'batches'} of a run's checkpoint on its validation
    split; `batches` defaults to the run's own `training.eval_batches`."""
    config, state, meta = load_run(workdir, step)
    mcfg = from_run_config(config)
    corpus, _, val = open_data(config, mcfg.seq_len)
    tokenizer = corpus.tokenizer
    if tokenizer.identity() != meta["data"]["tokenizer"]:
        raise CheckpointError(f"the corpus opened for {workdir} has tokenizer "
                              f"{tokenizer.identity()}, the run used {meta['data']['tokenizer']}")
    available = val.n_rows // config.data.batch_size
    n = min(batches or config.training.eval_batches, available)
    eval_step = make_eval_step(Transformer(mcfg), jnp.asarray(tokenizer.token_bytes),
                               pad_id=tokenizer.pad_id, vocab_chunk=config.training.vocab_chunk)
    print(f"{workdir} step {meta['step']}: {n} of {available} validation batches of "
          f"{config.data.batch_size} x {mcfg.seq_len} tokens")
    return {**evaluate(eval_step, state.params, val, n), "step": meta["step"], "batches": n}


def add_batches_flag(parser) -> None:
    """`--batches`: how many validation batches bits/byte is measured on."""
    parser.add_argument("--batches", type=int, default=None,
                        help="validation batches (default: the run's training.eval_batches)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser)
    add_batches_flag(parser)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_bpb(args.checkpoint, args.step, args.batches), indent=1))


if __name__ == "__main__":
    main()
