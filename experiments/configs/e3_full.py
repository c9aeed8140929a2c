"""E3 with every technique on, at the tiny size (minutes on 2 CPU cores): the ternary tiny
Rust model with sequential MTP, LoopLM (4 loops) and dynamic mHC (4 streams), Collider
token filtering (keep 70% by loss), trained by GaLore 2 with an 8-bit Muon inner step on
the hidden matrices and AdamW on the rest.

Larger runs: `--config.model.preset=125m --config.model.seq_len=1024 ...` (see BUILD.md).

`--config=e3_full:seed` is the seed's own E3 setting for comparison: multi-token prediction
of 4 future tokens (the next token plus 3 sequential MTP modules) and Collider keeping 0.5
of the tokens, without LoopLM and mHC; the optimizer and everything else as below.
"""

from experiments.configs import e3_galore2_muon_8bit, tiny_rust

VARIANTS = ("seed",)


def get_config(variant: str | None = None):
    if variant not in (None, "", *VARIANTS):
        raise ValueError(f"unknown e3_full variant {variant!r}: choose one of {VARIANTS}")
    c = tiny_rust.get_config()
    c.optimizer = e3_galore2_muon_8bit.get_config().optimizer
    c.optimizer.adam_lr = 3e-3  # the tiny model's AdamW rate (embedding, head, norms, gates)
    c.optimizer.warmup_steps = 30
    c.optimizer.galore_rank = 32  # a quarter of the tiny width (128 would be no projection)
    c.optimizer.galore_update_every = 50
    c.mtp.enabled = True
    c.loop.enabled = True
    c.mhc.enabled = True
    c.collider.enabled = True
    # Memory (BUILD.md "Where e3_full's memory goes"): recompute each loop's pass in the
    # backward instead of keeping 4 loops x 4 streams of activations, and take the loss of
    # the 4 loops + MTP ([5 x 2048, V] logits) in 1024-wide vocabulary chunks.
    c.model.remat = "loop"
    c.training.vocab_chunk = 1024
    c.training.steps = 300
    c.training.eval_every = 50
    c.checkpoint.every = 100
    if variant == "seed":
        c.mtp.depth = 3
        c.collider.keep_ratio = 0.5
        c.loop.enabled = False
        c.mhc.enabled = False
        c.model.remat = "none"  # the loop remat has no loops to reach
    return c
