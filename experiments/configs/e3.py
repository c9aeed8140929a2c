"""The E3 comparison: one optimizer arm per run, the rest of the run held fixed.

    --config=e3:ARM          the base run (125m, rust-src, 32k BPE) trained by ARM: adamw,
                             lion, muon, muon_8bit, galore2 or galore2_muon_8bit
    --config=e3:full         every technique at the tiny size (minutes on 2 CPU cores): the
                             ternary tiny Rust model with sequential MTP, LoopLM (4 loops),
                             dynamic mHC (4 streams) and Collider (keep 70% by loss), trained
                             by galore2_muon_8bit (or `e3:full,ARM`) at the tiny model's rates
    --config=e3:full,seed    the seed's own E3 setting for comparison: MTP of 4 future tokens
                             (the next plus 3 sequential modules), Collider keeping 0.5,
                             without LoopLM and mHC

Larger full runs: `--config=e3:full --config.model.preset=125m --config.model.seq_len=1024`
(BUILD.md). Arms' rates are for the 125m model; `full` sets the tiny model's.
"""

from experiments.configs import base, known_variants, tiny


def adamw(c):
    """The base run's AdamW on every leaf."""
    c.optimizer.name = "adamw"


def lion(c):
    """Lion (Chen et al. 2023) on every leaf at its own settings: b1 0.9, b2 0.99, a learning
    rate 5x below AdamW's (sign updates have RMS 1, so Lion wants 3-10x smaller rates) and a
    weight decay 5x above it, so lr x weight_decay (the decay per step) stays AdamW's."""
    c.optimizer.name = "lion"
    c.optimizer.lr = 3e-4  # AdamW's 1.5e-3 / 5
    c.optimizer.weight_decay = 0.5  # AdamW's 0.1 x 5
    c.optimizer.lion.b1 = 0.9
    c.optimizer.lion.b2 = 0.99


def muon(c):
    """Hybrid Muon (hidden matrices) + AdamW (embedding, head, norms)."""
    c.optimizer.name = "muon"
    c.optimizer.lr = 0.02
    c.optimizer.adam_lr = 3e-4
    c.optimizer.weight_decay = 0.1


def muon_8bit(c):
    """Hybrid Muon with every optimizer state >= 4096 elements stored as blockwise int8."""
    muon(c)
    c.optimizer.name = "muon_8bit"


def galore2(c):
    """GaLore 2 (rank-128 Adam on randomized-SVD projections, T=200, alpha=0.25, lr 0.01) on
    the hidden matrices; AdamW on the embedding, head and norms."""
    c.optimizer.name = "galore2"
    c.optimizer.lr = 0.01
    c.optimizer.adam_lr = 3e-4


def galore2_muon_8bit(c):
    """GaLore 2 projections with an 8-bit Muon inner step on the hidden matrices."""
    galore2(c)
    c.optimizer.name = "galore2_muon_8bit"
    c.optimizer.lr = 0.02


ARMS = {"adamw": adamw, "lion": lion, "muon": muon, "muon_8bit": muon_8bit,
        "galore2": galore2, "galore2_muon_8bit": galore2_muon_8bit}
VARIANTS = (*ARMS, "full", "seed")


def _full(c, arm: str):
    """Every technique on the tiny Rust model, `arm` at the tiny model's rates."""
    c.optimizer = base.get_config().optimizer  # the arm's rates, not tiny's AdamW ones
    ARMS[arm](c)
    c.optimizer.adam_lr = 3e-3  # the tiny model's AdamW rate (embedding, head, norms, gates)
    c.optimizer.warmup_steps = 30
    c.optimizer.galore.rank = 32  # a quarter of the tiny width (128 would be no projection)
    c.optimizer.galore.update_every = 50
    c.mtp.enabled = True
    c.loop.enabled = True
    c.mhc.enabled = True
    c.collider.enabled = True
    # Memory (BUILD.md#architecture-features-mtp-looplm-mhc): recompute each loop's pass in the
    # backward instead of keeping 4 loops x 4 streams of activations, and take the loss of
    # the 4 loops + MTP ([5 x 2048, V] logits) in 1024-wide vocabulary chunks.
    c.model.remat = "loop"
    c.training.vocab_chunk = 1024
    c.training.steps = 300
    c.training.eval_every = 50
    c.checkpoint.every = 100


def _seed(c):
    c.mtp.depth = 3
    c.collider.keep_ratio = 0.5
    c.loop.enabled = False
    c.mhc.enabled = False
    c.model.remat = "none"  # the loop remat has no loops to reach


def get_config(variants: str | None = None):
    names = known_variants(variants, VARIANTS, "e3",
                           f"an arm ({', '.join(ARMS)}) and/or full[,seed], comma-separated "
                           f"(--config=e3:muon, --config=e3:full)")
    arms = [v for v in names if v in ARMS]
    if len(arms) > 1:
        raise ValueError(f"e3 runs one optimizer arm, got {', '.join(arms)}")
    if "seed" in names and "full" not in names:
        raise ValueError("e3 variant 'seed' modifies 'full': use --config=e3:full,seed")
    if "full" in names:
        c = tiny.get_config("rust")
        _full(c, arms[0] if arms else "galore2_muon_8bit")
        if "seed" in names:
            _seed(c)
        return c
    c = base.get_config()
    ARMS[arms[0] if arms else "adamw"](c)
    return c
