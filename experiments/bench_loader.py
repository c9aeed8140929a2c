"""Does the loader keep up with the train step?  Loader tokens/s vs step tokens/s.

    python -m experiments.bench_loader --config=tiny:rust [--steps=100]

Measures, for the config's corpus, batch and model: (1) the loader alone (prefetch thread
+ device placement, consumed as fast as possible), (2) the train step alone on one fixed
batch, (3) the two together as in training, with the time the step loop spent waiting for
a batch. Prints a table and writes runs/bench/loader_<config>_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from experiments.configs.loading import load_config
from experiments.timing import per_call, step_seconds
from nanochat_jax.data.loader import Prefetcher
from nanochat_jax.data.pipeline import open_data
from nanochat_jax.model import config as model_config
from nanochat_jax.train.setup import setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = load_config(args.config)
    mcfg = model_config.from_run_config(config)
    corpus, train_data, _ = open_data(config, mcfg.seq_len)
    tokens = config.data.batch_size * mcfg.seq_len
    n = args.steps

    loader = Prefetcher(train_data, 0, depth=config.data.prefetch)
    loader_tps = tokens / per_call(lambda: next(loader)[1], n)
    loader.close()

    built = setup(config, model_config=mcfg, pad_id=corpus.tokenizer.pad_id, seed=0)
    state, step = built.state, built.train_step
    fixed = jax.device_put(train_data.batch(0))
    state, m = step(state, fixed)  # compile
    jax.block_until_ready(m)
    run = {"state": state, "step": step}
    step_tps = tokens / step_seconds(run, n, fixed)
    state = run["state"]

    loader = Prefetcher(train_data, 0, depth=config.data.prefetch)
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        w0 = time.perf_counter()
        _, batch = next(loader)
        waited += time.perf_counter() - w0
        state, m = step(state, batch)
    jax.block_until_ready(m)
    total = time.perf_counter() - t0
    loader.close()

    result = {"config": args.config, "device": jax.devices()[0].device_kind,
              "tokens_per_batch": tokens, "steps": n, "loader_tokens_per_sec": loader_tps,
              "step_tokens_per_sec": step_tps, "together_tokens_per_sec": n * tokens / total,
              "wait_fraction": waited / total}
    print(f"config {args.config}: {config.data.batch_size} x {mcfg.seq_len} tokens per batch, "
          f"{n} steps, prefetch depth {config.data.prefetch}, {result['device']}")
    print("| loader alone tok/s | step alone tok/s | training loop tok/s | loop time waiting "
          "for data |\n|---|---|---|---|")
    print(f"| {loader_tps:,.0f} | {step_tps:,.0f} | {result['together_tokens_per_sec']:,.0f} | "
          f"{100 * result['wait_fraction']:.2f}% |")
    out = args.out or os.path.join("runs", "bench",
                                   f"loader_{args.config}_{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
