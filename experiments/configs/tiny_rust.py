"""The tiny model on Rust: Debian's rust-src (`apt-get install rust-src`) with an 8k BPE.

The first run builds the corpus into the cache (~20 s on 2 cores), later runs reuse it.
"""

from experiments.configs import tiny


def get_config():
    c = tiny.get_config()
    c.data.source = "rust-src"
    c.data.max_bytes = 0
    c.data.vocab_size = 8192
    c.model.vocab_size = 8192
    return c
