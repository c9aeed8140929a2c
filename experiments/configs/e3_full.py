"""E3 with every technique on, at the tiny size (minutes on 2 CPU cores): the ternary tiny
Rust model with sequential MTP, LoopLM (4 loops) and dynamic mHC (4 streams), Collider
token filtering (keep 70% by loss), trained by GaLore 2 with an 8-bit Muon inner step on
the hidden matrices and AdamW on the rest.

Larger runs: `--config.model.preset=125m --config.model.seq_len=1024 ...` (see BUILD.md).
"""

from experiments.configs import e3_galore2_muon_8bit, tiny_rust


def get_config():
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
    return c
