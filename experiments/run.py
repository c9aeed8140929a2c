"""`python -m experiments.run --config=NAME [--config.group.field=value ...] [--workdir=DIR]`

NAME is a config family in `experiments/configs/` with optional variants
(`tiny:rust,gguf`; experiments/configs/__init__.py lists them, configs/loading.py loads
them), one of the names they had before families (`tiny_rust_gguf`), or a path to a config
file. Overrides go through
ml_collections' config flags; a name, variant or field that does not exist fails before any
compute. The default workdir is `runs/NAME` with the variants joined by underscores
(`runs/tiny_rust_gguf`); re-running the same command resumes from it.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from experiments.configs.loading import config_argv, define_config_flag, parse_flags
from nanochat_jax.errors import NanochatError

CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>).")


def main(argv: list[str], name: str) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nanochat_jax.eval.code import training_evaluators  # after flag parsing: fast --help
    from nanochat_jax.train.step import cpu_schedule_flags
    from nanochat_jax.train.trainer import train

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    workdir = _WORKDIR.value or os.path.join("runs", name)
    try:  # the CPU scheduler flag must be in place before JAX starts its CPU backend
        os.environ["XLA_FLAGS"] = cpu_schedule_flags(CONFIG.value.training.cpu_schedule,
                                                     os.environ.get("XLA_FLAGS", ""))
        summary = train(CONFIG.value, workdir, training_evaluators(CONFIG.value))
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    import jax

    if jax.process_index():
        return  # process 0 reports
    keys = ("loss/ce", "eval/ce", "eval/bpb", "throughput/tokens_per_sec", "throughput/mfu")
    print("final: step {} | ".format(summary["step"])
          + " | ".join(f"{k} {summary[k]:.4g}" for k in keys if k in summary))
    print(f"workdir: {workdir}  (tensorboard --logdir {os.path.join(workdir, 'tb')})")


def run() -> None:
    argv, name = config_argv(sys.argv)
    app.run(lambda a: main(a, name), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
