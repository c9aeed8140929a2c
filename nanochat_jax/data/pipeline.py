"""The data a run config asks for: its corpus spec, and the opened, verified corpus with its
train and validation batch sources (what the trainer, evaluation and benchmarks read)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import ml_collections

from nanochat_jax.data import corpus as corpus_lib
from nanochat_jax.data.loader import BatchSource
from nanochat_jax.errors import ConfigError


def corpus_spec(config: ml_collections.ConfigDict) -> corpus_lib.BuildSpec:
    """The corpus a run's `data` group asks for."""
    data = config.data
    return corpus_lib.BuildSpec(
        source=data.source, extensions=tuple(data.extensions), max_file_bytes=data.max_file_bytes,
        val_fraction=data.val_fraction, max_bytes=data.max_bytes, vocab_size=data.vocab_size)


def open_data(config: ml_collections.ConfigDict, seq_len: int,
              say: Callable[[str], None] = print):
    """Open (building if needed) and verify the corpus (every shard against its manifest
    hash); the train and validation batch sources."""
    data = config.data
    spec = corpus_spec(config)
    if data.corpus_dir and os.path.exists(os.path.join(data.corpus_dir, corpus_lib.MANIFEST)):
        corpus = corpus_lib.Corpus.open(data.corpus_dir)
        built = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in corpus.manifest["spec"].items()}
        wanted = dataclasses.asdict(spec)
        diff = {k: (built[k], wanted[k]) for k in wanted if built.get(k) != wanted[k]}
        if diff:
            raise ConfigError(f"data.corpus_dir={data.corpus_dir} was built with other settings "
                              f"(built, configured): {diff}; set the data.* fields to match "
                              f"or use another corpus_dir")
    else:
        corpus = corpus_lib.ensure(spec, data.corpus_dir)
    started = time.perf_counter()
    checked = corpus.verify()
    say(f"data: {checked['shards']} shards ({checked['bytes'] / 1e6:,.1f} MB) match their "
        f"manifest hashes ({time.perf_counter() - started:.2f} s)")
    tok = corpus.tokenizer
    train = BatchSource(corpus.shards("train"), tok.bos_id, data.batch_size, seq_len,
                        config.training.seed, shuffle=True, name="train")
    val = BatchSource(corpus.shards("val"), tok.bos_id, data.batch_size, seq_len,
                      config.training.seed, shuffle=False, name="validation")
    return corpus, train, val
