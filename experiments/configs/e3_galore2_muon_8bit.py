"""E3 arm: GaLore 2 projections with an 8-bit Muon inner step on the hidden matrices."""

from experiments.configs import e3_galore2


def get_config():
    c = e3_galore2.get_config()
    c.optimizer.name = "galore2_muon_8bit"
    c.optimizer.lr = 0.02
    return c
