"""The E3 benchmark's runs: the two AdamW baselines and the E3 arms, with the overrides they
share, each arm's rates at the tiny model, and the learning-rate grid of `--sweep=lr`."""

from __future__ import annotations

import numpy as np

from experiments.configs import variant_names
from experiments.configs.loading import canonical, load_config, run_name

# run names (experiments.configs.loading.run_name) e3_muon, ..., e3_full
E3_CONFIGS = ("e3:muon", "e3:muon_8bit", "e3:galore2", "e3:galore2_muon_8bit", "e3:full")
BASELINE = "adamw_dense"
# name -> (experiment config, overrides): the two AdamW references
BASELINES = {BASELINE: ("base", ["--config.model.ternary=False"]),
             "adamw_ternary": ("base", [])}
LR_FLAG = "--config.optimizer.lr="
SEED_FLAG = "--config.training.seed="
LOOP_FLAG = "--config.loop.enabled="
# Optimizers whose `optimizer.lr` is the rate of every leaf (not a Muon-family rate)
WHOLE_MODEL_RATES = ("adamw", "lion")


def is_e3(config: str) -> bool:
    """Whether a run's config is one of the seed's E3 arms (`E3_CONFIGS`, any variant of
    them, in new or old spelling); Lion and the AdamW references are not."""
    family, _, variants = canonical(config).partition(":")
    arms = {canonical(c).partition(":")[2] for c in E3_CONFIGS}
    return family == "e3" and bool(set(variant_names(variants)) & arms)


def _rate(lr: float) -> str:
    """A learning rate as an override spells it: 3e-3."""
    return np.format_float_scientific(lr, trim="-", exp_digits=1)


def tiny_rates() -> list[str]:
    """Every run's overrides at the tiny model: the AdamW group's rate and the GaLore
    projection that e3:full sets for the tiny model (the E3 configs' own are for 125m)."""
    optimizer = load_config("e3:full").optimizer
    return [f"--config.optimizer.adam_lr={_rate(optimizer.adam_lr)}",
            f"--config.optimizer.galore.rank={optimizer.galore.rank}",
            f"--config.optimizer.galore.update_every={optimizer.galore.update_every}"]


def tiny_lr(config: str) -> list[str]:
    """A run's `optimizer.lr` override at the tiny model: a config set for a larger model
    whose rate is every leaf's (AdamW, Lion) has it rescaled by the tiny config's AdamW rate
    over the base config's (dense AdamW: tiny's own; Lion: AdamW's / 5, as e3:lion). Muon
    and GaLore rates, and configs set for the tiny model already (e3:full), stay."""
    c = load_config(config)
    if c.model.preset == "tiny" or c.optimizer.name not in WHOLE_MODEL_RATES:
        return []
    scale = load_config("tiny").optimizer.lr / load_config("base").optimizer.lr
    return [f"{LR_FLAG}{_rate(c.optimizer.lr * scale)}"]


def runs(args, extra: list[str]) -> list[tuple[str, str, list[str]]]:
    """(run name, experiment config, overrides) for every run, the dense baseline first."""
    steps = args.steps
    common = [f"--config.model.preset={args.model}", f"--config.training.steps={steps}",
              f"--config.model.seq_len={args.seq_len}", f"--config.data.batch_size={args.batch}",
              "--config.data.source=rust-src", f"--config.data.max_bytes={args.max_bytes}",
              f"--config.data.vocab_size={args.vocab}", f"--config.model.vocab_size={args.vocab}",
              f"--config.training.eval_every={max(1, steps // args.evals)}",
              f"--config.training.log_every={max(1, min(10, steps // 10))}",
              f"--config.training.eval_batches={args.eval_batches}",
              f"--config.optimizer.warmup_steps={max(1, steps // 10)}",
              f"--config.checkpoint.every={steps}", f"--config.training.peak_flops={args.peak:.6g}"]
    tiny = args.model == "tiny"
    if tiny:
        common += tiny_rates()
    planned = [(name, cfg, over) for name, (cfg, over) in BASELINES.items()]
    planned += [(run_name(config), config, []) for config in args.configs]
    return [(name, cfg, common + over + (tiny_lr(cfg) if tiny else []) + extra)
            for name, cfg, over in planned]


def last_override(overrides: list[str], flag: str) -> str | None:
    """The value of the last override of `flag` (None: not overridden)."""
    return next((item[len(flag):] for item in reversed(overrides) if item.startswith(flag)),
                None)


def centre_lr(config: str, overrides: list[str]) -> float:
    """The arm's own `optimizer.lr`: the last override of it, else its config's value."""
    lr = last_override(overrides, LR_FLAG)
    if lr is not None:
        return float(lr)
    return float(load_config(config).optimizer.lr)


def is_looped(config: str, overrides: list[str]) -> bool:
    """Whether the arm runs LoopLM (`loop.enabled`), from its overrides or its config."""
    enabled = last_override(overrides, LOOP_FLAG)
    if enabled is None:
        return bool(load_config(config).loop.enabled)
    return enabled.lower() in ("true", "1")


def arm_multiples(config: str, overrides: list[str], multiples: list[float]) -> list[float]:
    """The multiples of the arm's rate it is swept over: `multiples`, and for a looped arm
    (LoopLM) one more below the smallest (half of it): Ouro trains looped models at smaller
    rates than plain ones, so the grid reaches lower there."""
    if is_looped(config, overrides):
        return sorted({min(multiples) / 2, *multiples})
    return sorted(multiples)


def lr_grid(arms: list[tuple[str, str, list[str]]], multiples: list[float]
            ) -> list[tuple[str, str, list[str], str, float, float]]:
    """(run name, config, overrides, arm, multiple, lr) for every arm (name, config,
    overrides) at every multiple of its own rate (`arm_multiples`)."""
    grid = []
    for arm, config, overrides in arms:
        centre = centre_lr(config, overrides)
        for m in arm_multiples(config, overrides, multiples):
            lr = float(f"{centre * m:.4g}")
            grid.append((f"{arm}_lr{lr:g}", config, [*overrides, f"{LR_FLAG}{lr:g}"], arm, m,
                         lr))
    return grid
