"""Decode throughput: tokens/s at batch 1 and 8, latent vs packed weights, +- speculative.

    python -m experiments.bench_decode --checkpoint=WORKDIR [--new_tokens=64 --rounds=5]
    python -m experiments.bench_decode --preset=125m [--mtp_depth=1 --loops=4]  # random init

Prompts are the builtin Rust problems' prompts (batch 8: eight different ones, right-padded).
Greedy decoding of exactly `new_tokens` tokens per row (no stop tokens), through
`Engine.generate` (prefill + the on-device decode loop); compilation is excluded. Weight
variants: "latent" (fp32 kernels, quantised and packed again on every call: the training
path), "fake_quant" (fp32 kernels, quantise + float matmul) and "packed" (2-bit I2 kernels
converted once, model/packed.py). With MTP, each also runs with self-speculative decoding
(whose output equals plain greedy decoding, so its tokens/s counts the same tokens), and a
looped model also decodes with LoopLM early exit at each of `--exit_thresholds`.
Rounds alternate over the variants so noise hits all alike; medians, ratios to "latent" at
the same batch, main-model passes and draft acceptance are printed and written as JSON.
Speculative numbers mean something only for a trained checkpoint (random MTP heads draft
noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from nanochat_jax.eval.rust import BUILTIN_PROBLEMS, load_problems
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.infer.load import load
from nanochat_jax.model.config import model_config
from nanochat_jax.model.packed import pack_params
from nanochat_jax.model.transformer import Transformer


def _model(args):
    """(ModelConfig, {'params'}, prompts as token lists, description)."""
    texts = [p.prompt for p in load_problems(BUILTIN_PROBLEMS)][:8]
    if args.checkpoint:
        loaded = load(args.checkpoint)
        tok = loaded.tokenizer
        prompts = [[tok.bos_id] + tok.encode(t).tolist() for t in texts]
        return loaded.cfg, loaded.variables, prompts, f"{args.checkpoint} step {loaded.step}"
    cfg = model_config(args.preset, mtp_depth=args.mtp_depth, loops=args.loops)
    variables = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    prompts = [[1] + [b % cfg.vocab_size for b in t.encode()] for t in texts]  # bytes as ids
    return cfg, variables, prompts, f"preset {args.preset} (random weights)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained run's workdir")
    parser.add_argument("--preset", default="tiny", help="without --checkpoint: random init")
    parser.add_argument("--mtp_depth", type=int, default=1, help="with --preset")
    parser.add_argument("--loops", type=int, default=1, help="with --preset")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exit_thresholds", default="0.5,0.9",
                        help="looped models: also latent decoding with these LoopLM exit "
                             "thresholds")
    parser.add_argument("--out", default=None,
                        help="JSON results (default runs/bench/decode_<backend>.json)")
    args = parser.parse_args()
    cfg, variables, prompts, what = _model(args)
    weights = {
        "latent": (cfg, variables),
        "fake_quant": (dataclasses.replace(cfg, ternary_impl="fake_quant"), variables),
        "packed": (cfg, pack_params(variables)),
    }
    engines = {name: Engine(Transformer(c), v) for name, (c, v) in weights.items()}
    modes = [False, True] if cfg.mtp_depth else [False]
    exits = [float(q) for q in args.exit_thresholds.split(",") if q] if cfg.loops > 1 else []
    cases = []
    for b in map(int, args.batches.split(",")):
        cases += [(name, b, spec, None) for name in engines for spec in modes]
        cases += [("latent", b, False, q) for q in exits]
    gens = {case: Generation(max_new_tokens=args.new_tokens, speculative=case[2],
                             exit_threshold=case[3]) for case in cases}
    times = {case: [] for case in cases}
    info = {}
    for case in cases:  # compile, and keep the tokens to compare with plain latent decoding
        info[case] = engines[case[0]].generate(prompts[:case[1]], gens[case])
    for r in range(args.rounds):
        for case in cases:
            t0 = time.perf_counter()
            engines[case[0]].generate(prompts[:case[1]], gens[case])
            times[case].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for case in cases:
        name, b, spec, q = case
        seconds = statistics.median(times[case])
        base = statistics.median(times[("latent", b, False, None)])
        res = info[case]
        same = res.tokens == info[("latent", b, False, None)].tokens
        rows.append({"weights": name, "batch": b, "speculative": spec, "exit_threshold": q,
                     "tokens_per_sec": b * args.new_tokens / seconds, "seconds": seconds,
                     "speedup_vs_latent": base / seconds, "main_passes": res.main_passes,
                     "acceptance": res.acceptance, "same_tokens_as_latent": same})
    print(f"\n{what}: {cfg.n_layers} layers, d_model {cfg.d_model}, MTP depth {cfg.mtp_depth}, "
          f"loops {cfg.loops}; {args.new_tokens} new tokens per row, "
          f"{jax.default_backend()}")
    print("| weights | batch | speculative | exit q | tokens/s | vs latent | main passes | "
          "acceptance | same tokens |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        q = "-" if row["exit_threshold"] is None else row["exit_threshold"]
        print(f"| {row['weights']} | {row['batch']} | {'yes' if row['speculative'] else 'no'} "
              f"| {q} | {row['tokens_per_sec']:.1f} | {row['speedup_vs_latent']:.2f} | "
              f"{row['main_passes']} | {row['acceptance']:.2f} | "
              f"{'yes' if row['same_tokens_as_latent'] else 'no'} |")
    out = args.out or os.path.join("runs", "bench", f"decode_{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"model": what, "new_tokens": args.new_tokens, "rounds": args.rounds,
                   "backend": jax.default_backend(), "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
