"""Evaluate a trained run: validation bits per byte and Rust code generation.

    python -m nanochat_jax.eval --checkpoint=WORKDIR [--problems=PATH] [--samples=N]

Prints bpb on the run's validation split, then the compile rate (`rustc --emit=metadata`),
test pass rate and pass@k of completions of a Rust problem set (default: the builtin set),
and writes them all as JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json

from nanochat_jax.errors import NanochatError
from nanochat_jax.eval.bpb import add_batches_flag, evaluate_bpb
from nanochat_jax.eval.code import Sampler, evaluate_code
from nanochat_jax.eval.rust import BUILTIN_PROBLEMS, load_problems
from nanochat_jax.infer.engine import Engine
from nanochat_jax.infer.load import add_checkpoint_flags, load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser)
    add_batches_flag(parser)
    parser.add_argument("--problems", default=str(BUILTIN_PROBLEMS),
                        help="JSONL problem file (ours, MultiPL-E or HumanEval-Rust format)")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: 0 (greedy) for one sample, 0.8 for more")
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--no_tests", action="store_true", help="compile rate only")
    parser.add_argument("--packed", action="store_true", help="run from 2-bit packed weights")
    parser.add_argument("--out", default=None, help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_bpb(args.checkpoint, args.step, args.batches)
        loaded = load(args.checkpoint, args.step, packed=args.packed)
        problems = load_problems(args.problems)
        temperature = args.temperature if args.temperature is not None else (
            0.0 if args.samples == 1 else 0.8)
        print(f"{len(problems)} problems from {args.problems}, {args.samples} sample(s) each, "
              f"temperature {temperature}")
        sampler = Sampler(Engine(loaded.model, loaded.variables), loaded.tokenizer,
                          max_new_tokens=args.max_new_tokens)
        metrics.update(evaluate_code(sampler, problems, samples=args.samples,
                                     temperature=temperature, tests=not args.no_tests))
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    for name, value in metrics.items():
        print(f"{name:>20}  {value:.4f}" if isinstance(value, float) else f"{name:>20}  {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
