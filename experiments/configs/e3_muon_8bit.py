"""E3 arm: hybrid Muon with every optimizer state >= 4096 elements stored as blockwise int8."""

from experiments.configs import e3_muon


def get_config():
    c = e3_muon.get_config()
    c.optimizer.name = "muon_8bit"
    return c
