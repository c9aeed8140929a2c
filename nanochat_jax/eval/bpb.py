"""Validation bits per byte of a trained run, on the corpus it was trained on.

`evaluate_bpb` rebuilds the model from the config saved with the checkpoint, opens (or
rebuilds) the same corpus, checks the tokenizer is the one the run used, and evaluates the
validation split with the trainer's own eval step (so the number matches the run's
`eval/bpb`). The command is `python -m nanochat_jax.cli.bpb`.
"""

from __future__ import annotations

import jax.numpy as jnp

from nanochat_jax.data.pipeline import open_data
from nanochat_jax.errors import CheckpointError
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

