"""GGUF export: the file holds our model in llama.cpp's names, layout and ternary block
formats, refuses what llama.cpp cannot compute, and llama.cpp runs it like our forward."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.cli.export_gguf import main
from nanochat_jax.data.tokenizer import train_tokenizer
from nanochat_jax.errors import ExportError
from nanochat_jax.export.gguf import LINEARS, TYPES, check_exportable, compare, write
from nanochat_jax.model.config import ModelConfig
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.ternary import quant

Q = gguf.GGMLQuantizationType
# every ternary layer's input a multiple of 256 (TQ blocks); the vocabulary padded past the
# tokenizer's 300 ids, as the presets pad theirs
CFG = ModelConfig(vocab_size=320, seq_len=64, d_model=256, n_layers=2, n_heads=2,
                  n_kv_heads=1, d_ff=512, tie_embeddings=True, ffn_activation="silu")


def _params(cfg=CFG, seed=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(seed), tokens)["params"]
    return jax.tree.map(np.asarray, params)


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("type_name", list(TYPES))
def test_the_file_reads_back_with_our_metadata_tokenizer_and_weights(tokenizer, tmp_path,
                                                                     type_name):
    params, path = _params(), str(tmp_path / "m.gguf")
    assert write(path, CFG, params, tokenizer, TYPES[type_name]) == []
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "bitnet"
    for key, want in [("block_count", 2), ("embedding_length", 256), ("context_length", 64),
                      ("feed_forward_length", 512), ("attention.head_count", 2),
                      ("attention.head_count_kv", 1), ("rope.dimension_count", 128)]:
        assert _field(reader, f"bitnet.{key}") == want, key
    assert _field(reader, "bitnet.rope.freq_base") == CFG.rope_theta
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == CFG.vocab_size  # one token per embedding row
    vocab = tokenizer.tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.bos_id] == gguf.TokenType.CONTROL
    assert types[vocab["fn"]] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED
    assert len(_field(reader, "tokenizer.ggml.merges")) == 300 - 263
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id

    tensors = {t.name: t for t in reader.tensors}
    per_block = [f"{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_sub_norm",
                                         "ffn_sub_norm", *LINEARS.values())]
    per_block += [f"{n}.scale" for n in LINEARS.values()]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}" for i in range(2) for n in per_block}

    def value(name):
        return gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)

    embed_tol = 0 if type_name == "f32" else 1e-3  # F16 otherwise
    np.testing.assert_allclose(value("token_embd.weight"), params["embed"]["embedding"],
                               atol=embed_tol * 0.1, rtol=embed_tol)
    assert list(tensors["token_embd.weight"].shape) == [256, 320]  # GGUF dims: ne0 = in
    np.testing.assert_array_equal(value("blk.1.ffn_sub_norm.weight"),
                                  params["block_1"]["ffn"]["ffn_sub_norm"]["scale"])
    for (sub, lin), name in LINEARS.items():
        codes, g = quant.ternary_codes(jnp.asarray(params["block_0"][sub][lin]["kernel"]))
        weight = tensors[f"blk.0.{name}.weight"]
        assert tensors[f"blk.0.{name}.weight"].tensor_type == TYPES[type_name]
        assert list(weight.shape) == list(codes.shape)  # [in, out] = numpy [out, in] reversed
        np.testing.assert_array_equal(value(f"blk.0.{name}.weight"), np.asarray(codes).T)
        np.testing.assert_array_equal(value(f"blk.0.{name}.scale"), [g])


@pytest.mark.parametrize("type_name,bits", [("tq2_0", 2.0625), ("tq1_0", 1.6875)])
def test_ternary_blocks_are_the_gguf_packages_own_encoding(tokenizer, tmp_path, type_name,
                                                           bits):
    params, path = _params(), str(tmp_path / "m.gguf")
    write(path, CFG, params, tokenizer, TYPES[type_name])
    tensors = _tensors(path)
    for (sub, lin), name in LINEARS.items():
        codes, _ = quant.ternary_codes(jnp.asarray(params["block_1"][sub][lin]["kernel"]))
        codes = np.asarray(codes, np.float32).T  # [out, in]
        stored = tensors[f"blk.1.{name}.weight"]
        reference = gguf.quants.quantize(codes, TYPES[type_name])
        np.testing.assert_array_equal(np.asarray(stored.data), reference)
        assert 8 * stored.n_bytes / stored.n_elements == bits
        # lossless: the blocks hold the codes exactly (block scale d = 1, g kept apart)
        np.testing.assert_array_equal(gguf.quants.dequantize(reference, TYPES[type_name]),
                                      codes)


def test_a_dense_model_exports_its_float_weights(tokenizer, tmp_path):
    cfg = dataclasses.replace(CFG, ternary=False)
    params, path = _params(cfg), str(tmp_path / "m.gguf")
    write(path, cfg, params, tokenizer, Q.F32)
    tensors = _tensors(path)
    assert not any(name.endswith(".scale") for name in tensors)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.ffn_down.weight"].data),
                                  params["block_0"]["ffn"]["w2"]["kernel"].T)


def test_mtp_modules_are_dropped_and_said_so(tokenizer, tmp_path):
    cfg = dataclasses.replace(CFG, mtp_depth=2)
    dropped = write(str(tmp_path / "m.gguf"), cfg, _params(cfg), tokenizer, Q.TQ2_0)
    assert len(dropped) == 1 and "mtp_0..mtp_1" in dropped[0]
    assert not any("mtp" in name for name in _tensors(str(tmp_path / "m.gguf")))


@pytest.mark.parametrize("change,type_name,message", [
    (dict(loops=2), "f16", "LoopLM (2 loops): llama.cpp runs each layer once"),
    (dict(mhc_streams=4), "f16", "mHC (4 residual streams)"),
    (dict(tie_embeddings=False), "f16", "--config.model.tie_embeddings=True"),
    (dict(ffn_activation="relu2"), "f16", "--config.model.ffn_activation=silu"),
    (dict(ternary=False), "tq2_0", "a dense model as TQ2_0"),
    (dict(d_model=128, d_ff=384), "tq1_0", "multiple of 256; this model has [128, 384]"),
])
def test_what_llama_cpp_cannot_compute_is_refused(tokenizer, tmp_path, change, type_name,
                                                  message):
    cfg = dataclasses.replace(CFG, **change)
    with pytest.raises(ExportError, match="cannot export to GGUF") as e:
        write(str(tmp_path / "m.gguf"), cfg, _params(cfg), tokenizer, TYPES[type_name])
    assert message in str(e.value)


def test_narrow_models_export_as_f16_and_byte_tokenizers_are_refused(tokenizer, tmp_path,
                                                                      rust_texts):
    cfg = dataclasses.replace(CFG, d_model=128, d_ff=384, n_heads=2)
    write(str(tmp_path / "narrow.gguf"), cfg, _params(cfg), tokenizer, Q.F16)
    with pytest.raises(ExportError, match="tokenizer without BPE merges"):
        write(str(tmp_path / "bytes.gguf"), CFG, _params(), train_tokenizer(iter(rust_texts), 263),
              Q.F16)


@pytest.mark.slow
def test_the_command_refuses_an_untied_run_before_writing(trained_run, tmp_path):
    workdir, _, _ = trained_run  # the tiny preset: untied head, squared ReLU, 128 wide
    out = tmp_path / "m.gguf"
    with pytest.raises(SystemExit, match="error: cannot export to GGUF.*untied output head"):
        main(["--checkpoint", workdir, "--out", str(out), "--type", "f16"])
    assert not out.exists()


@pytest.mark.slow
def test_a_run_of_the_exportable_config_exports_and_runs_in_llama_cpp(small_rust_gguf_config,
                                                                     tmp_path, capsys):
    _llama_cpp()
    from nanochat_jax.train.trainer import train

    small_rust_gguf_config.training.steps = small_rust_gguf_config.training.eval_every = 4
    workdir, out = str(tmp_path / "run"), tmp_path / "m.gguf"
    train(small_rust_gguf_config, workdir)
    capsys.readouterr()
    main(["--checkpoint", workdir, "--out", str(out), "--type", "tq1_0", "--check",
          "--new_tokens", "8"])
    printed = capsys.readouterr().out
    assert "TQ1_0, step 4" in printed and "1.6875 bits per ternary-layer weight" in printed
    assert "tokenizer equal" in printed and "argmax agreement" in printed
    assert out.stat().st_size > 0


# ---- llama.cpp itself ----

def _llama_cpp():
    """llama-cpp-python, or a skip saying how CI gets it."""
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]' "
        "compiles llama.cpp; .ci/run does)")


@pytest.fixture(scope="module")
def cycle_model(tokenizer, train_on_cycle):
    """(cycle, model, params): CFG trained for a moment on a cycle of Rust tokens."""
    cycle = tokenizer.encode("fn main() {\n    let mut v").tolist()[:5]
    assert len(set(cycle)) == 5
    return cycle, *train_on_cycle(CFG, cycle)


@pytest.mark.slow
@pytest.mark.parametrize("type_name", list(TYPES))
def test_llama_cpp_computes_our_next_token_logits(tokenizer, cycle_model, tmp_path, type_name):
    _llama_cpp()
    cycle, model, params = cycle_model
    path = str(tmp_path / "m.gguf")
    write(path, CFG, params, tokenizer, TYPES[type_name])
    ids = [tokenizer.bos_id] + cycle * 2 + [7, 40, 100]  # the last three leave the cycle
    r = compare(path, model, {"params": params}, ids, new_tokens=12)
    # llama.cpp rounds activations per 256 values (Q8_K) before ternary matmuls and not at
    # all before F16/F32 ones; ours rounds per token: a small relative difference remains
    # (measured 0.6-0.8% of the largest logit)
    assert r["max_logit_diff"] < 0.02 * r["logit_scale"], r
    assert r["argmax_agree"] == 1.0
    assert r["greedy_equal"], r
    assert set(r["ours_greedy"][:5]) == set(cycle)  # decisive logits: it learned the cycle


def test_llama_cpp_tokenizes_like_our_tokenizer(tokenizer, tmp_path, rust_texts):
    llama_cpp = _llama_cpp()
    path = str(tmp_path / "m.gguf")
    write(path, CFG, _params(), tokenizer, Q.F16)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
    for text in rust_texts[:3] + ["let x = 'a'; // ünïcödé\n\tfoo(x, 42)?;"]:
        ours = [tokenizer.bos_id] + tokenizer.encode(text).tolist()
        assert llm.tokenize(text.encode(), add_bos=True) == ours
        assert llm.detokenize(ours[1:]).decode() == text


@pytest.mark.parametrize("qtype", [Q.TQ2_0, Q.TQ1_0])
def test_the_zoos_tiny256_run_exports_to_ternary_gguf(tokenizer, qtype):
    from experiments.zoo import train_command, trained_model

    assert train_command("tiny256") == "python -m experiments.run --config=tiny:rust,gguf"
    assert check_exportable(trained_model("tiny256"), qtype, tokenizer) == []
