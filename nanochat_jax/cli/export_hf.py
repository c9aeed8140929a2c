"""Export a trained run as a model-hub directory, and load such a directory back.

    python -m nanochat_jax.cli.export_hf --checkpoint=WORKDIR --out=DIR [--step=N]
    python -m nanochat_jax.cli.export_hf --checkpoint=WORKDIR --out=DIR --format=transformers \
        [--quantization_mode=online|offline] [--check]

The two formats, and loading a directory back: nanochat_jax/export/hf.py.
"""

from __future__ import annotations

import argparse
import os

from nanochat_jax.cli.flags import add_checkpoint_flags
from nanochat_jax.errors import NanochatError
from nanochat_jax.export import hf_bitnet
from nanochat_jax.export.hf import export, export_transformers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--format", default="nanochat", choices=["nanochat", "transformers"],
                        help="nanochat: this package's format; transformers: a BitNet "
                        "model for AutoModelForCausalLM")
    parser.add_argument("--quantization_mode", default="online", choices=hf_bitnet.MODES,
                        help="--format=transformers: latent weights quantised on the fly "
                        "(online) or packed ternary codes (offline)")
    parser.add_argument("--check", action="store_true",
                        help="--format=transformers: load it with transformers (the hf "
                        "extra) and compare logits and 32 greedy tokens with ours")
    args = parser.parse_args(argv)
    if args.format == "nanochat" and (args.check or args.quantization_mode != "online"):
        parser.error("--check and --quantization_mode go with --format=transformers")
    try:
        if args.format == "transformers":
            result = export_transformers(args.checkpoint, args.out, args.quantization_mode,
                                         args.step, args.check)
        else:
            export(args.checkpoint, args.out, args.step)
            result = None
    except NanochatError as e:
        raise SystemExit(f"error: {e}") from None
    out = args.out
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))} ({size / 2**20:.1f} MiB)")
    if result is not None:
        print(f"transformers vs ours: last-position logits max |diff| "
              f"{result['max_abs_diff']:.3g} ({result['relative_diff']:.2%} of the largest "
              f"logit), argmax {'equal' if result['argmax_equal'] else 'DIFFERENT'}; "
              f"{len(result['ours'])} greedy tokens "
              f"{'equal' if result['greedy_equal'] else 'DIFFERENT'}")
        if not (result["argmax_equal"] and result["greedy_equal"]):
            raise SystemExit(f"error: transformers disagrees with our forward: ours "
                             f"{result['ours']}, theirs {result['theirs']}")


if __name__ == "__main__":
    main()
