"""Build a tokenized corpus from source files: dedup, filter, split, train BPE, write shards.

    python -m nanochat_jax.cli.corpus --source=rust-src --out=DIR [--vocab_size=32768]

The sources and what DIR gets: nanochat_jax/data/corpus.py.
"""

from __future__ import annotations

import argparse
import os

from nanochat_jax.data.corpus import MANIFEST, SOURCES, BuildSpec, build
from nanochat_jax.data.tokenizer import BYTE_VOCAB
from nanochat_jax.errors import DataError


def main(argv: list[str] | None = None) -> None:
    defaults = BuildSpec()
    p = argparse.ArgumentParser(description="Build a tokenized corpus (see module docstring).")
    p.add_argument("--source", default=defaults.source,
                   help=f"{', '.join(SOURCES)}, a directory or a glob")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab_size", type=int, default=defaults.vocab_size,
                   help=f"BPE vocabulary ({BYTE_VOCAB} = bytes only)")
    p.add_argument("--extensions", default=",".join(defaults.extensions))
    p.add_argument("--max_file_bytes", type=int, default=defaults.max_file_bytes)
    p.add_argument("--val_fraction", type=float, default=defaults.val_fraction)
    p.add_argument("--max_bytes", type=int, default=defaults.max_bytes)
    a = p.parse_args(argv)
    if os.path.exists(os.path.join(a.out, MANIFEST)):
        raise SystemExit(f"error: {a.out} already holds a corpus; choose another --out")
    spec = BuildSpec(a.source, tuple(a.extensions.split(",")), a.max_file_bytes, a.val_fraction,
                     a.max_bytes, a.vocab_size)
    try:
        m = build(spec, a.out)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    for split in ("train", "val"):
        s = m["splits"][split]
        print(f"{split}: {s['files']:,} files, {s['bytes']:,} bytes, {s['tokens']:,} tokens "
              f"({s['bytes'] / max(s['tokens'] - s['docs'], 1):.2f} bytes/token), "
              f"{len(s['shards'])} shard(s)")
    print(f"wrote {a.out} (content sha256 {m['content_sha256'][:16]}...)")


if __name__ == "__main__":
    main()
