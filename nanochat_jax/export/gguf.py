"""Export a trained run as a GGUF file that llama.cpp runs (its `bitnet` architecture).

The command is `python -m nanochat_jax.cli.export_gguf`; its `--check` runs the file in
llama.cpp (llama-cpp-python) and compares (`check`).

`--type` sets how the ternary layers are stored: `tq2_0` (2.0625 bits/weight) or `tq1_0`
(1.6875), llama.cpp's ternary block formats, or `f16` / `f32`. Each ternary layer is
written as its codes in {-1, 0, +1} plus a `<name>.scale` F32 tensor holding the absmean
scale g, which llama.cpp multiplies in after the matmul: the stored weights are exactly the
ones our forward pass uses (docs/techniques.md#gguf). Embedding (also the output head: `bitnet` ties
them) is F16, or F32 with `--type=f32`; norms are F32.

llama.cpp's `bitnet` block is ours (RMSNorm, rotate-half RoPE, GQA attention, sub-norm
before the output projection, gated FFN with a sub-norm before the down projection) with
two fixed choices, so the model must have `model.tie_embeddings=True` and
`model.ffn_activation=silu` (`--config=tiny:rust,gguf` trains one). LoopLM and mHC models
have no llama.cpp form and are refused; MTP modules are dropped (they never feed the
next-token logits). Remaining difference: llama.cpp rounds activations to int8 per block of
256 values (Q8_K) before a ternary matmul and not at all before an F16/F32 one, where our
forward rounds per token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import gguf
import jax.numpy as jnp
import numpy as np

from nanochat_jax.data.tokenizer import SPECIAL_TOKENS, BPETokenizer
from nanochat_jax.errors import ExportError
from nanochat_jax.export.common import dropped_parts, one_pass_problems
from nanochat_jax.infer.engine import Engine, Generation
from nanochat_jax.infer.load import load
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.ternary import quant

ARCH = "bitnet"
Q = gguf.GGMLQuantizationType
TYPES = {"tq2_0": Q.TQ2_0, "tq1_0": Q.TQ1_0, "f16": Q.F16, "f32": Q.F32}
FILE_TYPES = {Q.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0, Q.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
              Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.F32: gguf.LlamaFileType.ALL_F32}
# our Flax module names -> llama.cpp's tensor names in a block
LINEARS = {("attn", "q"): "attn_q", ("attn", "k"): "attn_k", ("attn", "v"): "attn_v",
           ("attn", "o"): "attn_output", ("ffn", "w1"): "ffn_gate", ("ffn", "w3"): "ffn_up",
           ("ffn", "w2"): "ffn_down"}
NORMS = {("attn_norm",): "attn_norm", ("ffn_norm",): "ffn_norm",
         ("attn", "attn_sub_norm"): "attn_sub_norm", ("ffn", "ffn_sub_norm"): "ffn_sub_norm"}


def check_exportable(cfg: ModelConfig, qtype: Q, tokenizer: BPETokenizer) -> list[str]:
    """Raise ExportError if llama.cpp's `bitnet` arch cannot compute this model; returns what
    is dropped from the file (parts that never feed the next-token logits)."""
    problems = one_pass_problems(cfg, "llama.cpp")
    if not cfg.tie_embeddings:
        problems.append("an untied output head: llama.cpp's bitnet arch uses the token "
                        "embedding as the head (train with --config.model.tie_embeddings=True)")
    if cfg.ffn_activation != "silu":
        problems.append(f"FFN activation {cfg.ffn_activation}: llama.cpp's bitnet arch gates "
                        f"with SiLU (train with --config.model.ffn_activation=silu)")
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype in (Q.TQ2_0, Q.TQ1_0):
        if not cfg.ternary:
            problems.append(f"a dense model as {qtype.name}: it would be ternarised on the way "
                            f"out; use --type=f16 or f32")
        narrow = sorted({n for n in (cfg.d_model, cfg.d_ff) if n % block})
        if narrow:
            problems.append(f"{qtype.name} needs every ternary layer's input width to be a "
                            f"multiple of {block}; this model has {narrow} (d_model "
                            f"{cfg.d_model}, d_ff {cfg.d_ff}): use --type=f16, or a preset "
                            f"such as tiny256")
    if not _merges(tokenizer):
        problems.append(f"a tokenizer without BPE merges ({tokenizer.vocab_size} byte-level "
                        f"ids): llama.cpp's gpt2 tokenizer needs merges (train with "
                        f"data.vocab_size > {len(SPECIAL_TOKENS) + 256})")
    if problems:
        raise ExportError("cannot export to GGUF (llama.cpp `bitnet` arch): "
                          + "; ".join(problems))
    return dropped_parts(cfg)


def tensors(params: dict, cfg: ModelConfig, qtype: Q) -> Iterator[tuple[str, np.ndarray, Q]]:
    """(llama.cpp name, array, stored type) of every tensor; quantised arrays are the
    `gguf` package's packed blocks [out, bytes per row], others [out, in] or [n]."""

    def f32(a):
        return np.ascontiguousarray(np.asarray(a, np.float32))

    embed_type = Q.F32 if qtype == Q.F32 else Q.F16
    yield "token_embd.weight", _encode(f32(params["embed"]["embedding"]), embed_type), embed_type
    yield "output_norm.weight", f32(params["final_norm"]["scale"]), Q.F32
    for i in range(cfg.n_layers):
        block = params[f"block_{i}"]
        for path, name in NORMS.items():
            node = block
            for key in path:
                node = node[key]
            yield f"blk.{i}.{name}.weight", f32(node["scale"]), Q.F32
        for (sub, lin), name in LINEARS.items():
            kernel = jnp.asarray(block[sub][lin]["kernel"])  # [in, out]
            if cfg.ternary:
                codes, g = quant.ternary_codes(kernel)  # codes * g is what our forward uses
                weight = f32(np.asarray(codes).T)  # [out, in] in {-1, 0, 1}
                yield f"blk.{i}.{name}.weight", _encode(weight, qtype), qtype
                yield f"blk.{i}.{name}.scale", f32(np.asarray(g).reshape(1)), Q.F32
            else:
                yield f"blk.{i}.{name}.weight", _encode(f32(kernel.T), qtype), qtype


def _encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """x [out, in] float32 in `qtype`'s storage (the gguf package's codecs)."""
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)


def _merges(tokenizer: BPETokenizer) -> list[str]:
    merges = json.loads(tokenizer.tok.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: BPETokenizer, vocab_size: int) -> None:
    """Our byte-level BPE as llama.cpp's `gpt2` tokenizer (GPT-2 pre-tokenizer regex, the
    same as `tokenizers`' ByteLevel); model rows past the tokenizer's ids become UNUSED
    tokens so the token list matches the embedding."""
    by_id = sorted(tokenizer.tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [token for token, _ in by_id]
    special = {tokenizer.tok.token_to_id(t) for t in SPECIAL_TOKENS}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
             for _, i in by_id]
    pad = vocab_size - len(tokens)
    tokens += [f"<|unused_{k}|>" for k in range(pad)]
    types += [gguf.TokenType.UNUSED] * pad
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_id)  # every training document starts with BOS
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write(path: str, cfg: ModelConfig, params: dict, tokenizer: BPETokenizer, qtype: Q,
          name: str = "nanochat-jax") -> list[str]:
    """Write the GGUF file; returns what was dropped (see `check_exportable`)."""
    dropped = check_exportable(cfg, qtype, tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{cfg.vocab_size} embedding rows")
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    add_tokenizer(writer, tokenizer, cfg.vocab_size)
    for tensor_name, array, stored in tensors(params, cfg, qtype):
        quantised = stored not in (Q.F32, Q.F16)
        writer.add_tensor(tensor_name, array, raw_dtype=stored if quantised else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dropped


def export(workdir: str, out: str, type_name: str, step: int | None = None) -> dict:
    """Write `workdir`'s checkpoint (default: latest) to `out`; a summary of the file."""
    if type_name not in TYPES:
        raise ExportError(f"unknown --type {type_name!r}: choose one of {', '.join(TYPES)}")
    if os.path.exists(out):
        raise ExportError(f"{out} exists; choose another --out")
    run = load(workdir, step)
    qtype = TYPES[type_name]
    name = f"nanochat-jax {run.config.model.preset} step {run.step}"
    dropped = write(out, run.cfg, run.variables["params"], run.tokenizer, qtype, name)
    return {"path": out, "bytes": os.path.getsize(out), "type": qtype.name, "step": run.step,
            "dropped": dropped, **bits_per_weight(out)}


def bits_per_weight(path: str) -> dict:
    """Stored bits per ternary-layer weight and per weight overall, read from the file."""
    reader = gguf.GGUFReader(path)
    linear = [t for t in reader.tensors if t.name.split(".")[-2] in LINEARS.values()
              and t.name.endswith(".weight")]

    def bits(ts):
        return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)

    return {"bits_per_linear_weight": bits(linear), "bits_per_weight": bits(reader.tensors)}


def _llama(path: str, n_ctx: int):
    """llama.cpp (through llama-cpp-python) with the file loaded, F32 KV cache, all logits."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ExportError("comparing with llama.cpp needs llama-cpp-python: pip install -e "
                          "'.[llama]' (it compiles llama.cpp, 4-13 minutes on 2 cores)") from e
    return Llama(model_path=path, n_ctx=n_ctx, logits_all=True, flash_attn=False, type_k=0,
                 type_v=0, n_threads=os.cpu_count(), verbose=False)


def compare(path: str, model, variables: dict, ids: list[int], new_tokens: int = 32,
            llm=None) -> dict:
    """llama.cpp running the file vs our model on prompt `ids`: max |logit difference| over
    the prompt's positions, argmax agreement, and both greedy continuations."""
    if len(ids) + new_tokens > model.cfg.seq_len:
        raise ExportError(f"prompt ({len(ids)} tokens) + {new_tokens} new tokens exceeds the "
                          f"context {model.cfg.seq_len}")
    llm = llm or _llama(path, model.cfg.seq_len)
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)], np.float32)  # [T, V]
    llama_greedy = []
    for _ in range(new_tokens):
        llama_greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([llama_greedy[-1]])
    ours = np.asarray(model.apply(variables, jnp.asarray([ids]))[0], np.float32)  # [T, V]
    result = Engine(model, variables).generate([ids], Generation(max_new_tokens=new_tokens))
    ours_greedy = [int(t) for t in result.tokens[0]]
    return {"prompt_tokens": len(ids), "max_logit_diff": float(np.abs(theirs - ours).max()),
            "logit_scale": float(np.abs(ours).max()),
            "argmax_agree": float(np.mean(theirs.argmax(-1) == ours.argmax(-1))),
            "greedy_equal": llama_greedy == ours_greedy, "llama_greedy": llama_greedy,
            "ours_greedy": ours_greedy}


def check(path: str, workdir: str, prompt: str, new_tokens: int = 32,
          step: int | None = None) -> dict:
    """`compare` for an exported run on a text prompt, tokenised by llama.cpp (which must
    agree with our tokenizer)."""
    run = load(workdir, step)
    llm = _llama(path, run.cfg.seq_len)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
    ours_ids = [run.tokenizer.bos_id] + run.tokenizer.encode(prompt).tolist()
    result = compare(path, run.model, run.variables, ids, new_tokens, llm)
    return {**result, "tokenizer_equal": ids == ours_ids,
            "text": run.tokenizer.decode(result["llama_greedy"])}
