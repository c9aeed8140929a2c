"""Decode roofline: the bytes one generated token reads, per preset, against each GPU's memory
bandwidth: the floor on batch-1 decode time (and ceiling on tokens/s) a GPU run is held to.

    python -m experiments.roofline [--gpus=h100,h200,b200] [--context=1024] [--out=FILE]

At batch 1 a decode step multiplies one row by every weight, so it is bound by the bytes it
reads, not by FLOPs. Per token the inference engine reads (infer/engine.py, as it is now):
the packed ternary weights (2 bits each plus one fp32 scale per matrix: `experiments.zoo`'s
count), the LM head in float32 (the engine casts the fp32 head to the compute dtype inside
every step, so all of it is read), and the KV cache, float32, every allocated slot (cached
attention masks the slots past the position rather than skipping them): 2 (K and V) x
layers x kv heads x slots x head dim x 4 bytes, with `--context` slots. Bandwidths are the
`memory_bandwidth` of each GPU's target config (experiments/targets/). Nothing is compiled
or run: the table is arithmetic on the model's shapes.
"""

from __future__ import annotations

import argparse
import json
import os

from experiments import targets
from experiments.zoo import sizes, trained_model
from nanochat_jax.model.config import PRESETS

F32 = 4


def token_bytes(preset: str, context: int) -> dict[str, float]:
    """What one batch-1 decode token reads of `preset` (the model its zoo command trains),
    with a KV cache of `context` slots: packed weights, head and cache, in bytes."""
    cfg = trained_model(preset)
    counted = sizes(cfg)
    head = cfg.vocab_size * cfg.d_model * F32
    cache = 2 * cfg.n_layers * cfg.n_kv_heads * context * cfg.head_dim * F32
    return {"preset": preset, "packed": float(counted["ternary_packed_bytes"]),
            "head": float(head), "kv_cache": float(cache),
            "total": float(counted["ternary_packed_bytes"] + head + cache)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="h100,h200,b200",
                        help=f"comma-separated, from experiments/targets/: {targets.names()}")
    parser.add_argument("--context", type=int, default=1024, help="KV cache slots")
    parser.add_argument("--out", default="runs/roofline/decode.json", help="JSON result file")
    args = parser.parse_args(argv)
    gpus = [g for g in args.gpus.split(",") if g]
    unknown = sorted(set(gpus) - set(targets.names()))
    if unknown or args.context < 1:
        parser.error(f"--gpus: unknown {unknown} (choose from {targets.names()})" if unknown
                     else "--context must be >= 1")
    rates = {gpu: targets.field(gpu, "memory_bandwidth") for gpu in gpus}
    rows = []
    for preset in PRESETS:
        row = token_bytes(preset, args.context)
        row["ms_per_token"] = {gpu: 1e3 * row["total"] / rate for gpu, rate in rates.items()}
        rows.append(row)

    def mib(n: float) -> str:
        return f"{n / 2**20:,.1f}"

    print(f"batch-1 decode, KV cache of {args.context} slots (float32, every slot read); "
          f"floor = bytes / bandwidth: " + ", ".join(f"{g} {r / 1e12:.2f} TB/s"
                                                    for g, r in rates.items()))
    print("| preset | packed weights MiB | head MiB (fp32) | KV cache MiB (fp32) | "
          "MiB / token | " + " | ".join(f"{g}: ms / token (tokens/s)" for g in gpus) + " |")
    print("|" + "---|" * (5 + len(gpus)))
    for r in rows:
        cells = " | ".join(f"{r['ms_per_token'][g]:.3f} ({1e3 / r['ms_per_token'][g]:,.0f})"
                           for g in gpus)
        print(f"| {r['preset']} | {mib(r['packed'])} | {mib(r['head'])} | "
              f"{mib(r['kv_cache'])} | {mib(r['total'])} | {cells} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"context": args.context, "bandwidth_bytes_per_s": rates, "rows": rows},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
