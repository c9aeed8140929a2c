"""The tiny Rust model in a form llama.cpp runs: `python -m nanochat_jax.cli.export_gguf` takes it.

llama.cpp's `bitnet` architecture ties the output head to the token embedding and gates its
FFN with SiLU, and its ternary block formats (TQ1_0, TQ2_0) need layer inputs a multiple of
256 wide: so a tied, SwiGLU, 256-wide `tiny256` model on the `tiny_rust` data.
"""

from experiments.configs import tiny_rust


def get_config():
    c = tiny_rust.get_config()
    c.model.preset = "tiny256"
    c.model.tie_embeddings = True
    c.model.ffn_activation = "silu"
    return c
