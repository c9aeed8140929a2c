"""Export a trained run as a GGUF file that llama.cpp runs (its `bitnet` architecture).

    python -m nanochat_jax.cli.export_gguf --checkpoint=WORKDIR --out=model.gguf --type=tq2_0
        [--step=N] [--check]   # --check: run it in llama.cpp (llama-cpp-python) and compare

The file's layout, the types and what llama.cpp cannot run: nanochat_jax/export/gguf.py.
"""

from __future__ import annotations

import argparse

from nanochat_jax.cli.flags import add_checkpoint_flags
from nanochat_jax.errors import NanochatError
from nanochat_jax.export.gguf import TYPES, check, export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser)
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--type", default="tq2_0", choices=list(TYPES),
                        help="storage of the ternary layers")
    parser.add_argument("--check", action="store_true",
                        help="load the file in llama.cpp and compare logits and greedy output")
    parser.add_argument("--prompt", default="fn main() {\n    let mut v = Vec::new();\n",
                        help="the prompt --check compares on")
    parser.add_argument("--new_tokens", type=int, default=32, help="greedy tokens --check "
                        "compares")
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, args.type, args.step)
        print(f"wrote {info['path']}: {info['type']}, step {info['step']}, "
              f"{info['bytes'] / 2**20:.2f} MiB, {info['bits_per_linear_weight']:.4f} bits per "
              f"ternary-layer weight, {info['bits_per_weight']:.3f} bits per weight overall")
        for part in info["dropped"]:
            print(f"dropped: {part}")
        if args.check:
            r = check(args.out, args.checkpoint, args.prompt, args.new_tokens, args.step)
            print(f"llama.cpp vs ours on a {r['prompt_tokens']}-token prompt: tokenizer "
                  f"{'equal' if r['tokenizer_equal'] else 'DIFFERENT'}, max |logit diff| "
                  f"{r['max_logit_diff']:.4f} (logit scale {r['logit_scale']:.2f}), argmax "
                  f"agreement {r['argmax_agree']:.0%}, greedy {args.new_tokens} tokens "
                  f"{'equal' if r['greedy_equal'] else 'DIFFERENT'}")
            print(f"llama.cpp continuation: {r['text']!r}")
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
