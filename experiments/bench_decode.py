"""Decode speed: our engine against llama.cpp on the same model, prefill and decode apart.

    python -m experiments.bench_decode --checkpoint=WORKDIR [--gguf=F] [--new_tokens=48]
    python -m experiments.bench_decode --preset=125m [--mtp_depth=1 --loops=4]  # random init

With `--checkpoint` the run is exported to GGUF (`--gguf_type`, default tq2_0; or `--gguf=F`
takes a file already exported from it) and llama.cpp (llama-cpp-python, the `llama` extra)
decodes the same prompt at batch 1 beside our engine. Prompts are the builtin Rust problems'
prompts (batch 8: eight different ones, right-padded; batch 1: the first), encoded by the
run's tokenizer, the same ids for both engines. Greedy decoding of exactly `new_tokens`
tokens per row (no stop tokens); the prefill makes the first, the decode loop the rest.
Compilation is excluded (one untimed warm-up per case).

Our weight variants: "packed" (what `Engine` does by default: the ternary kernels packed to
2 bits once, run by the native CPU kernel where there is one), "latent" (`pack=False`: fp32
kernels ternarised inside each compiled call and multiplied by XLA's int8 dot, the engine's
old path) and "fake_quant" (float products of the dequantised weights). With MTP each also
runs self-speculative decoding (output equal to plain greedy decoding); a looped model also
decodes with LoopLM early exit at each of `--exit_thresholds`. Rounds alternate over every
case, llama.cpp included, so noise hits all alike. Printed and written as JSON: median
prefill ms, decode tokens/s and ms per step, the ratio to llama.cpp's batch-1 decode,
main-model passes, draft acceptance, and whether the tokens equal plain decoding with the
first `--weights` variant (and llama.cpp's)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import alternating_rounds, medians
from nanochat_jax.eval.problems import BUILTIN_PROBLEMS, load_problems
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.infer.load import load
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary import cpu_kernel

LLAMA = "llama.cpp"


@dataclasses.dataclass(frozen=True)
class Case:
    engine: str  # "ours" | LLAMA
    weights: str  # ours: packed | latent | fake_quant; llama.cpp: the GGUF type
    batch: int
    speculative: bool = False
    exit_threshold: float | None = None


def _model(args):
    """(ModelConfig, {'params'}, prompts as token lists, description, tokenizer or None)."""
    texts = [p.prompt for p in load_problems(BUILTIN_PROBLEMS)][:8]
    if args.checkpoint:
        loaded = load(args.checkpoint)
        tok = loaded.tokenizer
        prompts = [[tok.bos_id] + tok.encode(t).tolist() for t in texts]
        return (loaded.cfg, loaded.variables, prompts,
                f"{args.checkpoint} step {loaded.step}")
    cfg = model_config(args.preset, vocab_size=args.vocab_size, seq_len=2048,
                       mtp_depth=args.mtp_depth, loops=args.loops)
    variables = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    prompts = [[1] + [b % cfg.vocab_size for b in t.encode()] for t in texts]  # bytes as ids
    return cfg, variables, prompts, f"preset {args.preset} (random weights)"


class LlamaCpp:
    """Greedy decoding through llama-cpp-python, timed like `Engine.generate`."""

    def __init__(self, path: str, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """-> (tokens, prefill seconds, decode seconds)."""
        llm = self.llm
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        tokens = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval(tokens[-1:])
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return tokens, prefilled - started, time.perf_counter() - prefilled


def _gguf(args, workdir: str) -> str:
    """The GGUF file of `workdir`: `--gguf`, or exported now into a temporary directory."""
    if args.gguf:
        return args.gguf
    from nanochat_jax.export import gguf

    path = os.path.join(tempfile.mkdtemp(prefix="bench_decode_"), "model.gguf")
    info = gguf.export(workdir, path, args.gguf_type)
    print(f"exported {path}: {info['type']}, {info['bytes'] / 2**20:.2f} MiB", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained run's workdir")
    parser.add_argument("--gguf", default=None, help="with --checkpoint: its GGUF export "
                        "(default: export it now)")
    parser.add_argument("--gguf_type", default="tq2_0", help="the export's ternary type")
    parser.add_argument("--no_llama", action="store_true", help="skip llama.cpp")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama.cpp's threads (ours: XLA's, every core)")
    parser.add_argument("--preset", default="tiny", help="without --checkpoint: random init")
    parser.add_argument("--vocab_size", type=int, default=32768,
                        help="with --preset (presets hold the architecture only)")
    parser.add_argument("--mtp_depth", type=int, default=1, help="with --preset")
    parser.add_argument("--loops", type=int, default=1, help="with --preset")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--weights", default="packed,latent,fake_quant",
                        help="our weight variants to time")
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exit_thresholds", default="0.5,0.9",
                        help="looped models: also decode with these LoopLM exit thresholds")
    parser.add_argument("--out", default=None,
                        help="JSON results (default runs/bench/decode_<backend>.json)")
    args = parser.parse_args()
    if args.new_tokens < 2:
        raise SystemExit("error: --new_tokens must be >= 2 (the prefill makes the first)")
    cfg, variables, prompts, what = _model(args)
    kinds = {"packed": (cfg, True), "latent": (cfg, False),
             "fake_quant": (dataclasses.replace(cfg, ternary_product="fake_quant"), False)}
    names = [w for w in args.weights.split(",") if w]
    if unknown := set(names) - set(kinds):
        raise SystemExit(f"error: unknown --weights {sorted(unknown)}: choose from "
                         f"{', '.join(kinds)}")
    engines = {w: Engine(Transformer(kinds[w][0]), variables, pack=kinds[w][1]) for w in names}
    batches = [int(b) for b in args.batches.split(",") if b]
    modes = [False, True] if cfg.mtp_depth else [False]
    exits = [float(q) for q in args.exit_thresholds.split(",") if q] if cfg.loops > 1 else []
    cases = []
    for b in batches:
        cases += [Case("ours", w, b, spec) for w in names for spec in modes]
        cases += [Case("ours", names[0], b, False, q) for q in exits]
    llama = None
    if args.checkpoint and not args.no_llama:
        n_ctx = max(len(p) for p in prompts) + args.new_tokens + 8
        llama = LlamaCpp(_gguf(args, args.checkpoint), n_ctx, args.threads)
        cases.insert(0, Case(LLAMA, args.gguf_type, 1))

    def run(case: Case):
        """-> (tokens per row, prefill s, decode s, main passes, acceptance)."""
        if case.engine == LLAMA:
            tokens, prefill, decode = llama.generate(prompts[0], args.new_tokens)
            return [tokens], prefill, decode, args.new_tokens - 1, 0.0
        gen = Generation(max_new_tokens=args.new_tokens, speculative=case.speculative,
                         exit_threshold=case.exit_threshold)
        r = engines[case.weights].generate(prompts[:case.batch], gen)
        return r.tokens, r.prefill_seconds, r.decode_seconds, r.main_passes, r.acceptance

    def seconds(case: Case) -> tuple[float, float]:
        """(prefill s, decode s) of one more run of `case`."""
        return run(case)[1:3]

    first = {case: run(case) for case in cases}  # compiles; keeps the tokens
    times = alternating_rounds(
        {case: functools.partial(seconds, case) for case in cases}, args.rounds,
        after_round=lambda n, _: print(f"round {n}/{args.rounds} done", flush=True))
    prefill_s = medians({case: [t[0] for t in samples] for case, samples in times.items()})
    decode_s = medians({case: [t[1] for t in samples] for case, samples in times.items()})

    def decode_rate(case):
        return case.batch * (args.new_tokens - 1) / decode_s[case]

    reference = {b: first.get(Case("ours", names[0], b)) for b in batches}
    llama_rate = decode_rate(cases[0]) if llama else None
    rows = []
    for case in cases:
        tokens, _, _, passes, acceptance = first[case]
        prefill = prefill_s[case]
        rate = decode_rate(case)
        ours_plain = reference.get(case.batch)
        rows.append({
            **dataclasses.asdict(case), "prefill_ms": prefill * 1e3,
            "decode_tokens_per_sec": rate, "ms_per_step": 1e3 * case.batch / rate,
            "vs_llama_cpp": rate / llama_rate if llama_rate else None,
            "main_passes": passes, "acceptance": acceptance,
            "same_tokens_as_plain": (ours_plain is not None and tokens
                                      == ours_plain[0][:len(tokens)]),
            "same_tokens_as_llama_cpp": (tokens[0] == first[cases[0]][0][0]) if llama else None,
            "prefill_samples_s": [t[0] for t in times[case]],
            "decode_samples_s": [t[1] for t in times[case]]})
    print(f"\n{what}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
          f"MTP depth {cfg.mtp_depth}, loops {cfg.loops}; {len(prompts[0])}-token prompt at "
          f"batch 1, {args.new_tokens} new tokens per row; {jax.default_backend()}, CPU "
          f"kernel: {cpu_kernel.instruction_path()}, llama.cpp threads {args.threads}")
    print("| engine | weights | batch | speculative | exit q | prefill ms | decode tokens/s | "
          "ms/step | vs llama.cpp | main passes | acceptance | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        q = "-" if row["exit_threshold"] is None else row["exit_threshold"]
        vs = "-" if row["vs_llama_cpp"] is None else f"{row['vs_llama_cpp']:.2f}"
        same = "yes" if row["same_tokens_as_plain"] else "no"
        if row["same_tokens_as_llama_cpp"] is not None:
            same += f" (llama.cpp: {'yes' if row['same_tokens_as_llama_cpp'] else 'no'})"
        print(f"| {row['engine']} | {row['weights']} | {row['batch']} | "
              f"{'yes' if row['speculative'] else 'no'} | {q} | {row['prefill_ms']:.1f} | "
              f"{row['decode_tokens_per_sec']:.1f} | {row['ms_per_step']:.2f} | {vs} | "
              f"{row['main_passes']} | {row['acceptance']:.2f} | {same} |")
    out = args.out or os.path.join("runs", "bench", f"decode_{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"model": what, "prompt_tokens": len(prompts[0]),
                   "new_tokens": args.new_tokens, "rounds": args.rounds,
                   "backend": jax.default_backend(), "cpu_kernel": cpu_kernel.instruction_path(),
                   "threads": args.threads, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
