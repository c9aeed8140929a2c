"""Export a trained run as a Hugging Face `transformers` BitNet model directory.

    python -m nanochat_jax.cli.export_hf --checkpoint=WORKDIR --out=DIR --format=transformers \\
        [--quantization_mode=online|offline] [--check]

`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads DIR as `BitNetForCausalLM`
(`model_type: "bitnet"`) and `AutoTokenizer.from_pretrained(DIR)` as our tokenizer, so tools
built on `transformers` (evaluation harnesses, `convert_hf_to_gguf.py`, serving stacks) take
our models. Our default block is theirs: RMSNorm, rotate-half RoPE, grouped-query attention
with a sub-norm before the output projection, a gated FFN (squared ReLU, `hidden_act:
relu2`, or SiLU) with a sub-norm before the down projection, no biases; every linear layer
in the blocks is absmean-ternary with per-token int8 activations (`quantization_config`:
`quant_method: bitnet`, `linear_class: autobitlinear`), the embedding, the head and the
norms full precision.

`quantization_mode`:

- `online` (default): the latent fp32 weights; `AutoBitLinear` ternarises them on every
  call with our formula (round(W / mean|W|) clipped to [-1, 1], times mean|W|), so the
  directory can also be fine-tuned in `transformers`.
- `offline`: the ternary codes, four rows per uint8 (`transformers`' `pack_weights`
  layout: code + 1 in bits 2i..2i+1 of row r for output row i * out/4 + r), and each
  layer's absmean scale as `weight_scale`: 2 bits per weight on disk, inference only.

A dense run (`model.ternary=False`) is written without a `quantization_config` (plain
`nn.Linear` layers). LoopLM and mHC models have no BitNet form and are refused; MTP
modules are left out (they never feed the next-token logits), said on stdout.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from nanochat_jax.data.tokenizer import SPECIAL_TOKENS, BPETokenizer
from nanochat_jax.errors import ExportError
from nanochat_jax.export.common import dropped_parts, one_pass_problems
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.ternary import quant

MODES = ("online", "offline")
WEIGHTS = "model.safetensors"
VALUES_PER_BYTE = 4  # transformers' VALUES_PER_ITEM: four 2-bit codes per uint8
# our Flax module names -> transformers' in a decoder layer
LINEARS = {("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj",
           ("attn", "v"): "self_attn.v_proj", ("attn", "o"): "self_attn.o_proj",
           ("ffn", "w1"): "mlp.gate_proj", ("ffn", "w3"): "mlp.up_proj",
           ("ffn", "w2"): "mlp.down_proj"}
NORMS = {("attn_norm",): "input_layernorm", ("ffn_norm",): "post_attention_layernorm",
         ("attn", "attn_sub_norm"): "self_attn.attn_sub_norm",
         ("ffn", "ffn_sub_norm"): "mlp.ffn_sub_norm"}
ACTIVATIONS = {"relu2": "relu2", "silu": "silu"}  # ours -> transformers' hidden_act


def check_exportable(cfg: ModelConfig, mode: str) -> list[str]:
    """Raise ExportError if `BitNetForCausalLM` cannot compute this model; returns what is
    left out of the directory (parts that never feed the next-token logits)."""
    if mode not in MODES:
        raise ExportError(f"unknown quantization_mode {mode!r}: choose one of "
                          f"{', '.join(MODES)}")
    problems = one_pass_problems(cfg, "BitNetForCausalLM")
    if cfg.ffn_activation not in ACTIVATIONS:
        problems.append(f"FFN activation {cfg.ffn_activation}: transformers' BitNet gates with "
                        f"{' or '.join(ACTIVATIONS)}")
    if mode == "offline":
        if not cfg.ternary:
            problems.append("a dense model in offline mode: it would be ternarised on the way "
                            "out; use --quantization_mode=online (written as plain linear "
                            "layers)")
        narrow = sorted({n for n in (cfg.d_model, cfg.d_ff, cfg.n_kv_heads * cfg.head_dim)
                         if n % VALUES_PER_BYTE})
        if narrow:
            problems.append(f"offline packing stores {VALUES_PER_BYTE} output rows per byte; "
                            f"output widths {narrow} are not multiples of it: use "
                            f"--quantization_mode=online")
    if problems:
        raise ExportError("cannot export as a transformers BitNet model: "
                          + "; ".join(problems))
    return dropped_parts(cfg)


def hf_config(cfg: ModelConfig, tokenizer: BPETokenizer, mode: str) -> dict:
    """config.json of `BitNetForCausalLM` for this architecture."""
    config = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": ACTIVATIONS[cfg.ffn_activation],
        "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id, "torch_dtype": "float32", "use_cache": True,
    }
    if cfg.ternary:
        config["quantization_config"] = {
            "quant_method": "bitnet", "linear_class": "autobitlinear",
            "quantization_mode": mode, "use_rms_norm": False,
            # the head (and with tied embeddings the embedding) stays full precision
            "modules_to_not_convert": ["lm_head"]}
    return config


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Ternary codes [out, in] in {-1, 0, 1} -> uint8 [out / 4, in], transformers'
    `pack_weights` layout: row r holds code + 1 of output rows r, R + r, 2R + r, 3R + r
    (R = out / 4) in bits 0-1, 2-3, 4-5, 6-7."""
    out, width = codes.shape
    fields = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(VALUES_PER_BYTE,
                                                                    out // VALUES_PER_BYTE,
                                                                    width)
    packed = np.zeros(fields.shape[1:], np.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= fields[i] << np.uint8(2 * i)
    return packed


def hf_tensors(params: dict, cfg: ModelConfig, mode: str) -> dict[str, np.ndarray]:
    """transformers' tensor names -> arrays: linear weights [out, in] (float32 latents
    online; packed uint8 codes and a float32 `weight_scale` [1] offline), norms [D]."""

    def f32(a):
        return np.ascontiguousarray(np.asarray(a, np.float32))

    tensors = {"model.embed_tokens.weight": f32(params["embed"]["embedding"]),
               "model.norm.weight": f32(params["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = f32(np.asarray(params["lm_head"]).T)  # [D, V] -> [V, D]
    for i in range(cfg.n_layers):
        block, prefix = params[f"block_{i}"], f"model.layers.{i}"
        for path, name in NORMS.items():
            node = block
            for key in path:
                node = node[key]
            tensors[f"{prefix}.{name}.weight"] = f32(node["scale"])
        for (sub, lin), name in LINEARS.items():
            kernel = block[sub][lin]["kernel"]  # [in, out]
            if mode == "offline":
                codes, g = quant.ternary_codes(jnp.asarray(kernel))
                tensors[f"{prefix}.{name}.weight"] = pack_codes(np.asarray(codes).T)
                tensors[f"{prefix}.{name}.weight_scale"] = f32(np.asarray(g).reshape(1))
            else:
                tensors[f"{prefix}.{name}.weight"] = f32(np.asarray(kernel).T)
    return tensors


def tokenizer_config(tokenizer: BPETokenizer, cfg: ModelConfig) -> dict:
    """tokenizer_config.json: `AutoTokenizer` builds a `PreTrainedTokenizerFast` over our
    tokenizer.json with our special tokens; no BOS is added (prepend `bos_token_id`, as our
    engine's prompts do)."""
    bos, eos, pad = SPECIAL_TOKENS[:3]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            "pad_token": pad, "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
            "model_max_length": cfg.seq_len, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False}


def write(out: str, cfg: ModelConfig, params: dict, tokenizer: BPETokenizer,
          mode: str = "online") -> list[str]:
    """Write the transformers directory `out`; returns what was left out (`check_exportable`)."""
    dropped = check_exportable(cfg, mode)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{cfg.vocab_size}")
    if os.path.exists(os.path.join(out, WEIGHTS)):
        raise ExportError(f"{out} already holds an export; choose another --out")
    os.makedirs(out, exist_ok=True)
    save_file(hf_tensors(params, cfg, mode), os.path.join(out, WEIGHTS),
              metadata={"format": "pt"})  # transformers reads torch-format safetensors
    files = {"config.json": hf_config(cfg, tokenizer, mode),
             "tokenizer_config.json": tokenizer_config(tokenizer, cfg),
             "generation_config.json": {"bos_token_id": tokenizer.bos_id,
                                        "eos_token_id": tokenizer.eos_id,
                                        "pad_token_id": tokenizer.pad_id}}
    for name, content in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f, indent=1)
    tokenizer.save(out)
    return dropped


def load_transformers(directory: str):
    """(model, tokenizer) of a directory through `transformers`' Auto classes, on the CPU,
    in float32, in eval mode."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ExportError("loading with transformers needs the hf extra: pip install -e "
                          "'.[hf]' (torch 2.13 CPU wheel, transformers, accelerate)") from e
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 device_map="cpu")
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def compare(directory: str, model, variables: dict, ids: list[int],
            new_tokens: int = 32) -> dict:
    """Our forward vs transformers' on the directory: last-position logits of `ids` (max
    difference relative to the largest logit, argmax equal) and `new_tokens` greedy tokens
    each (ours from the Engine with its KV cache, theirs from `generate`)."""
    import torch

    theirs, _ = load_transformers(directory)
    ours_logits = np.asarray(model.apply(variables, jnp.asarray([ids])))[0, -1]
    with torch.no_grad():
        prompt = torch.tensor([ids])
        their_logits = theirs(prompt).logits[0, -1].numpy()
        their_tokens = theirs.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                       eos_token_id=None, pad_token_id=0,
                                       min_new_tokens=new_tokens)[0, len(ids):].tolist()
    our_tokens = Engine(model, variables).generate(
        [ids], Generation(max_new_tokens=new_tokens)).tokens[0]
    scale = float(np.max(np.abs(ours_logits)))
    return {"max_abs_diff": float(np.max(np.abs(ours_logits - their_logits))),
            "relative_diff": float(np.max(np.abs(ours_logits - their_logits)) / scale),
            "argmax_equal": int(np.argmax(ours_logits)) == int(np.argmax(their_logits)),
            "ours": list(map(int, our_tokens)), "theirs": their_tokens,
            "greedy_equal": list(map(int, our_tokens)) == their_tokens}
