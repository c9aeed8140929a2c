"""The quick start: a ~0.9M-parameter ternary model on the Python standard library with a
byte-level tokenizer (real text on any machine with Python), about 2 minutes on 2 CPU cores."""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"
    c.model.seq_len = 128
    c.model.vocab_size = 384  # the 263 byte-level ids, padded to a multiple of 128
    c.data.source = "python-stdlib"
    c.data.vocab_size = 263  # specials + 256 bytes: no BPE merges
    c.data.max_bytes = 4_000_000
    c.data.batch_size = 16
    c.training.steps = 600
    c.training.log_every = 10
    c.training.eval_every = 100
    c.training.eval_batches = 4
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.checkpoint.every = 100
    return c
