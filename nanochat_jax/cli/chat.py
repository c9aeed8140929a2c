"""Talk to a trained run: stream completions of what you type.

    python -m nanochat_jax.cli.chat --checkpoint=WORKDIR [--prompt=TEXT] [--temperature=0.7]

Our models are base models trained on source files, so each turn is a completion: the model
continues your text (`\\n` in a line becomes a newline, so `fn add(a: i32, b: i32) -> i32 {\\n`
asks for a body) until it ends the document (BOS/EOS) or reaches `--max_new_tokens`. Text is
printed as tokens arrive. With `--prompt` one completion is printed and the command exits;
otherwise it reads prompts from stdin until EOF or an empty line.
"""

from __future__ import annotations

import argparse
import sys

import jax

from nanochat_jax.cli.flags import add_checkpoint_flags
from nanochat_jax.errors import NanochatError
from nanochat_jax.infer.chat import stream_text
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.infer.load import load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser)
    parser.add_argument("--prompt", default=None, help="complete this and exit")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=50, help="0: off")
    parser.add_argument("--top_p", type=float, default=0.95, help="1: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--packed", action="store_true",
                        help="convert the ternary weights to 2-bit packed once and run from them")
    parser.add_argument("--speculative", action="store_true",
                        help="MTP self-speculative greedy decoding (needs --temperature=0)")
    parser.add_argument("--exit_threshold", type=float, default=None,
                        help="LoopLM adaptive exit: leave the loop once P(exit) >= this")
    args = parser.parse_args(argv)
    try:
        loaded = load(args.checkpoint, args.step, packed=args.packed)
        tok = loaded.tokenizer
        gen = Generation(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p,
                         stop_tokens=(tok.bos_id, tok.eos_id),
                         exit_threshold=args.exit_threshold, speculative=args.speculative)
        engine = Engine(loaded.model, loaded.variables)
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.checkpoint} step {loaded.step}: {loaded.config.model.preset} model, "
          f"{tok.name} tokenizer, {'packed' if args.packed else 'latent'} weights",
          file=sys.stderr)
    key = jax.random.key(args.seed)
    prompts = [args.prompt] if args.prompt is not None else _read_prompts()
    for turn, prompt in enumerate(prompts):
        prompt = prompt.replace("\\n", "\n")
        sys.stdout.write(prompt)
        try:
            _, n, seconds = stream_text(engine, tok, prompt, gen, jax.random.fold_in(key, turn))
        except NanochatError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"[{n} tokens, {n / seconds:.1f} tokens/s including compilation]",
              file=sys.stderr)


def _read_prompts():
    """Prompts typed on stdin, one a line, until EOF or an empty line."""
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")


if __name__ == "__main__":
    main()
