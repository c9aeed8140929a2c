"""nanochat-jax: ternary-weight (BitNet b1.58) language models in JAX/Flax."""
