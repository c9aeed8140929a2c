"""E3 arm: the base run with hybrid Muon (hidden matrices) + AdamW (embedding, head, norms)."""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.optimizer.name = "muon"
    c.optimizer.lr = 0.02
    c.optimizer.adam_lr = 3e-4
    c.optimizer.weight_decay = 0.1
    return c
