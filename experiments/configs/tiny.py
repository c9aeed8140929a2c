"""The tiny model family (a ~0.9M-parameter ternary model; minutes on 2 CPU cores).

    --config=tiny            the quick start: the Python standard library, byte-level
                             tokenizer (real text on any machine with Python), ~2 minutes
    --config=tiny:rust       Debian's rust-src (`apt-get install rust-src`) with an 8k BPE;
                             the first run builds the corpus into the cache (~20 s)
    --config=tiny:rust,gguf  a form llama.cpp runs (`python -m nanochat_jax.cli.export_gguf`)
    --config=tiny:rust,mtp   sequential multi-token prediction, depth 1 (self-speculative
                             decoding drafts with it)

Variants compose in the order given.
"""

from experiments.configs import apply_variants, base


def rust(c):
    """Debian's rust-src, every file, an 8k BPE."""
    c.data.source = "rust-src"
    c.data.max_bytes = 0
    c.data.vocab_size = 8192
    c.model.vocab_size = 8192


def gguf(c):
    """llama.cpp's `bitnet` architecture ties the output head to the token embedding and
    gates its FFN with SiLU, and its ternary block formats (TQ1_0, TQ2_0) need layer inputs
    a multiple of 256 wide: a tied, SwiGLU, 256-wide `tiny256` model."""
    c.model.preset = "tiny256"
    c.model.tie_embeddings = True
    c.model.ffn_activation = "silu"


def mtp(c):
    """One sequential MTP module (DeepSeek-V3): a second loss, and drafts for decoding."""
    c.mtp.enabled = True
    c.mtp.depth = 1


VARIANTS = {"rust": rust, "gguf": gguf, "mtp": mtp}


def get_config(variants: str | None = None):
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
    return apply_variants(c, variants, VARIANTS, "tiny")
