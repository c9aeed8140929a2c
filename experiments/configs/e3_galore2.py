"""E3 arm: GaLore 2 (rank-128 Adam on randomized-SVD projections, T=200, alpha=0.25, lr 0.01)
on the hidden matrices; AdamW on the embedding, head and norms."""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.optimizer.name = "galore2"
    c.optimizer.lr = 0.01
    c.optimizer.adam_lr = 3e-4
    return c
