"""Validation bits per byte of a trained run, on the corpus it was trained on.

    python -m nanochat_jax.cli.bpb --checkpoint=WORKDIR [--step=N] [--batches=N]

Prints `evaluate_bpb` (eval/bpb.py) as JSON: the number matches the run's own `eval/bpb`.
"""

from __future__ import annotations

import argparse
import json

from nanochat_jax.cli.flags import add_batches_flag, add_checkpoint_flags
from nanochat_jax.eval.bpb import evaluate_bpb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser)
    add_batches_flag(parser)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_bpb(args.checkpoint, args.step, args.batches), indent=1))


if __name__ == "__main__":
    main()
