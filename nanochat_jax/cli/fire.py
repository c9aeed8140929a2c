"""FIRE on a run's checkpoint (docs/techniques.md#fire), as a new run that the runner resumes.

    python -m nanochat_jax.cli.fire --workdir=RUN --out=NEW [--step=N] [--iters=30]

restores RUN's latest (or step N) checkpoint, applies FIRE, and saves it at the same step
in NEW/checkpoints; `python -m experiments.run --config=... --workdir=NEW` (the same config,
more steps) then resumes from it.
"""

from __future__ import annotations

import argparse
import os

from nanochat_jax.errors import NanochatError
from nanochat_jax.optim.fire import ITERS
from nanochat_jax.train.fire_checkpoint import fire_checkpoint


def command_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FIRE a run's checkpoint into a new workdir "
                                            "(docs/techniques.md#fire).")
    p.add_argument("--workdir", required=True, help="the run whose checkpoint to read")
    p.add_argument("--out", required=True, help="new workdir to write the FIRE'd checkpoint to")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--iters", type=int, default=ITERS, help="Newton-Schulz iterations")
    return p


def main(argv: list[str] | None = None) -> None:
    a = command_parser().parse_args(argv)
    try:
        s = fire_checkpoint(a.workdir, a.out, a.step, a.iters)
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"FIRE ({a.iters} iterations) on {a.workdir} step {s['step']}: {s['leaves']} "
          f"matrices re-initialised, max |G - (d_out/d_in) I| = {s['max_isometry_error']:.2e}; "
          f"their optimizer moments reset")
    if s["max_isometry_error"] > 1e-3:
        print(f"note: not yet an isometry after {a.iters} iterations (small singular values "
              f"grow ~1.5x per iteration); raise --iters (square matrices need ~50)")
    print(f"wrote {os.path.join(a.out, 'checkpoints', str(s['step']))}; train with "
          f"--workdir={a.out} to continue from it")


if __name__ == "__main__":
    main()
