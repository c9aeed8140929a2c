"""Evaluate a trained run: validation bits per byte and Rust code generation.

    python -m nanochat_jax.cli.eval --checkpoint=WORKDIR [--problems=PATH|builtin|humaneval-rust]
        [--samples=N] [--save_generations=F.jsonl]
    python -m nanochat_jax.cli.eval --load_generations=F.jsonl [--problems=...]   # re-score

Prints bpb on the run's validation split, then the compile rate (`rustc --emit=metadata`),
test pass rate and pass@k of completions of a Rust problem set (default: the builtin set),
and writes them all as JSON with `--out`. `--save_generations` keeps every raw completion
(JSON lines: task_id, sample, completion, checkpoint, step, temperature); `--load_generations`
scores such a file without a model (generate on one machine, execute on another; re-score
without regenerating). Test binaries run without network access where the OS allows it
(eval/sandbox.py; the output says which).
"""

from __future__ import annotations

import argparse
import json
import time

from nanochat_jax.cli.flags import add_batches_flag, add_checkpoint_flags
from nanochat_jax.errors import NanochatError
from nanochat_jax.eval.bpb import evaluate_bpb
from nanochat_jax.eval.code import (
    Sampler,
    generate_completions,
    load_generations,
    save_generations,
    score_completions,
)
from nanochat_jax.eval.problems import PROBLEM_SETS, load_problems
from nanochat_jax.eval.sandbox import network_isolation
from nanochat_jax.infer.engine import Engine
from nanochat_jax.infer.load import load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser, required=False)
    add_batches_flag(parser)
    parser.add_argument("--problems", default="builtin",
                        help=f"JSONL problem file (ours, MultiPL-E or HumanEval-Rust format) "
                        f"or a set's name: {', '.join(PROBLEM_SETS)}")
    parser.add_argument("--samples", type=int, default=1, help="completions per problem")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: 0 (greedy) for one sample, 0.8 for more")
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--no_tests", action="store_true", help="compile rate only")
    parser.add_argument("--packed", action="store_true", help="run from 2-bit packed weights")
    parser.add_argument("--save_generations", default=None, metavar="F.jsonl",
                        help="write every raw completion here")
    parser.add_argument("--load_generations", default=None, metavar="F.jsonl",
                        help="score these completions instead of generating (no model)")
    parser.add_argument("--out", default=None, help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    if args.load_generations and (args.checkpoint or args.save_generations):
        parser.error("--load_generations scores a file without a model: drop --checkpoint "
                     "and --save_generations")
    if not args.load_generations and not args.checkpoint:
        parser.error("--checkpoint is required (or --load_generations=F.jsonl)")
    try:
        problems = load_problems(args.problems, say=print)
        if args.load_generations:
            metrics: dict = {}
            completions = load_generations(args.load_generations, problems)
            print(f"{len(problems)} problems from {args.problems}, {len(completions[0])} "
                  f"completion(s) each from {args.load_generations}")
        else:
            metrics = evaluate_bpb(args.checkpoint, args.step, args.batches)
            loaded = load(args.checkpoint, args.step, packed=args.packed)
            temperature = args.temperature if args.temperature is not None else (
                0.0 if args.samples == 1 else 0.8)
            print(f"{len(problems)} problems from {args.problems}, {args.samples} sample(s) "
                  f"each, temperature {temperature}")
            sampler = Sampler(Engine(loaded.model, loaded.variables), loaded.tokenizer,
                              max_new_tokens=args.max_new_tokens)
            start = time.monotonic()
            completions = generate_completions(sampler, problems, samples=args.samples,
                                               temperature=temperature)
            metrics["eval/generation_seconds"] = time.monotonic() - start
            if args.save_generations:
                save_generations(args.save_generations, problems, completions,
                                 checkpoint=args.checkpoint, step=loaded.step,
                                 temperature=temperature)
                print(f"wrote {args.save_generations}")
        if not args.no_tests:
            print(network_isolation())
        start = time.monotonic()
        metrics.update(score_completions(problems, completions, tests=not args.no_tests))
        metrics["eval/scoring_seconds"] = time.monotonic() - start
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    for name, value in metrics.items():
        print(f"{name:>24}  {value:.4f}" if isinstance(value, float) else f"{name:>24}  {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=1)


if __name__ == "__main__":
    main()
