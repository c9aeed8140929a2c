"""E3 arm: the base run with Lion (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms") on every leaf, at Lion's own settings: b1 0.9, b2 0.99, a learning rate 5x
below AdamW's (sign updates have RMS 1, so Lion wants 3-10x smaller rates) and a weight
decay 5x above it, so lr x weight_decay (the decay per step) stays AdamW's."""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.optimizer.name = "lion"
    c.optimizer.lr = 3e-4  # AdamW's 1.5e-3 / 5
    c.optimizer.weight_decay = 0.5  # AdamW's 0.1 x 5
    c.optimizer.lion_b1 = 0.9
    c.optimizer.lion_b2 = 0.99
    return c
