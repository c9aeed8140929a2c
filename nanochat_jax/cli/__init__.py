"""The commands: each module parses its flags and calls the library (levanter's `main/`).

    python -m nanochat_jax.cli.corpus           build a tokenized corpus (data/corpus.py)
    python -m nanochat_jax.cli.chat             stream completions of a trained run (infer/)
    python -m nanochat_jax.cli.eval             bpb, compile and pass rates of a run (eval/)
    python -m nanochat_jax.cli.bpb              validation bits per byte of a run (eval/bpb.py)
    python -m nanochat_jax.cli.grpo             training-free GRPO on Rust (eval/grpo.py)
    python -m nanochat_jax.cli.check_solutions  test a problem set's canonical solutions
    python -m nanochat_jax.cli.export_gguf      a run as a GGUF file for llama.cpp
    python -m nanochat_jax.cli.export_hf        a run as a model-hub directory
    python -m nanochat_jax.cli.fire             FIRE a run's checkpoint into a new run

The library modules have no argparse: this package is the only right-hand edge of the
layers besides `experiments/`.
"""
