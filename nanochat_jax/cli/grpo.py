"""Training-free GRPO for Rust: a frozen model improves through lessons prepended to its prompts.

    python -m nanochat_jax.cli.grpo --checkpoint=WORKDIR --library=lessons.json [--epochs=3]

Rolls out with `eval.code.Sampler` over the inference engine, saves the library after every
epoch and resumes from `--library` when the file exists. The method and our choices:
nanochat_jax/eval/grpo.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from nanochat_jax.cli.flags import add_checkpoint_flags
from nanochat_jax.errors import EvalError
from nanochat_jax.eval.code import Sampler
from nanochat_jax.eval.experience import ExperienceLibrary
from nanochat_jax.eval.grpo import run_epoch
from nanochat_jax.eval.problems import PROBLEM_SETS, load_problems
from nanochat_jax.infer.engine import Engine
from nanochat_jax.infer.load import load


def main(argv: list[str] | None = None) -> None:
    """Run training-free GRPO epochs with a trained run as the policy."""
    parser = argparse.ArgumentParser(description="Training-free GRPO on Rust problems")
    add_checkpoint_flags(parser)
    parser.add_argument("--library", required=True,
                        help="experience library JSON: resumed if it exists, saved every epoch")
    parser.add_argument("--problems", default="builtin",
                        help=f"JSONL problem file (ours, MultiPL-E or HumanEval-Rust format) "
                        f"or a set's name: {', '.join(PROBLEM_SETS)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--group_size", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--no_ab_test", action="store_true",
                        help="skip the library-free rollouts (and so the harmful-lesson deletion)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        loaded = load(args.checkpoint, args.step)
        problems = load_problems(args.problems, say=print)
        library = (ExperienceLibrary.load(args.library) if os.path.exists(args.library)
                   else ExperienceLibrary())
        sampler = Sampler(Engine(loaded.model, loaded.variables), loaded.tokenizer,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)
        first = library.epoch + 1 if os.path.exists(args.library) else 0
        print(f"{len(problems)} problems, group size {args.group_size}, library of "
              f"{len(library.items)} lessons; epochs {first}..{first + args.epochs - 1}")
        for epoch in range(first, first + args.epochs):
            stats = run_epoch(problems, sampler, library, group_size=args.group_size,
                              temperature=args.temperature, epoch=epoch,
                              ab_test=not args.no_ab_test)
            library.save(args.library)
            print(json.dumps(dataclasses.asdict(stats)), flush=True)
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"library: {len(library.items)} lessons in {args.library}")
    for line in library.render().splitlines():
        print("  " + line)


if __name__ == "__main__":
    main()
