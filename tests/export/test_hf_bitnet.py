"""transformers BitNet export: the directory loads through AutoModelForCausalLM and
AutoTokenizer as BitNetForCausalLM and computes our next-token logits and greedy tokens;
what BitNet cannot hold is refused, MTP modules are left out and said so."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from nanochat_jax.cli.export_hf import main
from nanochat_jax.errors import ExportError
from nanochat_jax.export.hf_bitnet import check_exportable, compare, pack_codes, write
from nanochat_jax.model.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the tiny block with GQA (4 heads, 2 KV), squared-ReLU gate, untied head: our defaults
CFG = ModelConfig(vocab_size=320, seq_len=64, d_model=64, n_layers=2, n_heads=4,
                  n_kv_heads=2, d_ff=128)


def _transformers():
    return pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[hf]', the "
        "torch 2.13 CPU wheel and transformers; .ci/run does)")


@pytest.mark.slow
def test_offline_packing_is_transformers_unpack_weights_inverse():
    codes = np.random.default_rng(0).integers(-1, 2, size=(16, 24)).astype(np.int8)
    packed = pack_codes(codes)
    assert packed.shape == (4, 24) and packed.dtype == np.uint8
    # transformers' layout: field i of row r is output row i * (out / 4) + r, stored + 1
    fields = np.stack([(packed >> (2 * i)) & 3 for i in range(4)]).reshape(16, 24)
    np.testing.assert_array_equal(fields.astype(np.int8) - 1, codes)
    _transformers()
    import torch
    from transformers.integrations.bitnet import unpack_weights

    theirs = unpack_weights(torch.from_numpy(packed), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(theirs, codes)


@pytest.mark.parametrize("change, message", [
    (dict(loops=2), "LoopLM"), (dict(mhc_streams=4), "mHC")])
def test_what_bitnet_cannot_hold_is_refused_before_writing(tokenizer, tmp_path, change,
                                                            message):
    cfg = dataclasses.replace(CFG, **change)
    with pytest.raises(ExportError, match=message):
        write(str(tmp_path / "hf"), cfg, {}, tokenizer)
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ExportError, match="online"):
        check_exportable(dataclasses.replace(CFG, ternary=False), "offline")
    with pytest.raises(ExportError, match="quantization_mode"):
        check_exportable(CFG, "int4")


def test_mtp_modules_are_left_out_and_said_so():
    dropped = check_exportable(dataclasses.replace(CFG, mtp_depth=2), "online")
    assert dropped and "mtp_0..mtp_1" in dropped[0]
    assert check_exportable(CFG, "offline") == []


@pytest.fixture(scope="module")
def cycle(tokenizer):
    ids = tokenizer.encode("fn main() {\n    let mut v").tolist()[:5]
    assert len(set(ids)) == 5
    return ids


@pytest.mark.parametrize("tied, mode, ternary", [
    (False, "online", True),  # 5-20 s each (torch start-up, transformers' loading): one fast
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        (True, "online", True), (False, "offline", True), (True, "offline", True),
        (False, "online", False)])])
@pytest.mark.slow
def test_transformers_computes_our_logits_and_greedy_tokens(tokenizer, cycle, train_on_cycle,
                                                           tmp_path, tied, mode, ternary):
    _transformers()
    from transformers.integrations.bitnet import AutoBitLinear

    cfg = dataclasses.replace(CFG, tie_embeddings=tied, ternary=ternary)
    model, params = train_on_cycle(cfg, cycle)
    out = str(tmp_path / "hf")
    assert write(out, cfg, params, tokenizer, mode) == []
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["tie_word_embeddings"] == tied
    assert ("quantization_config" in config) == ternary
    ids = [tokenizer.bos_id] + cycle * 2 + [7, 40, 100]  # the last three leave the cycle
    r = compare(out, model, {"params": params}, ids, new_tokens=32)
    assert r["relative_diff"] < 0.01, r  # the bar: 1% of the largest logit
    assert r["argmax_equal"] and r["greedy_equal"], r
    assert set(r["ours"][:5]) == set(cycle)  # decisive logits: it learned the cycle
    from nanochat_jax.export.hf_bitnet import load_transformers

    theirs, _ = load_transformers(out)
    assert type(theirs).__name__ == "BitNetForCausalLM"
    layer = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(layer, AutoBitLinear) == ternary
    if ternary:
        assert layer.online_quant == (mode == "online")


@pytest.mark.slow
def test_auto_tokenizer_tokenizes_like_ours(tokenizer, rust_texts, train_on_cycle, cycle,
                                            tmp_path):
    _transformers()
    from transformers import AutoTokenizer

    model, params = train_on_cycle(CFG, cycle, steps=1)
    write(str(tmp_path / "hf"), CFG, params, tokenizer)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    for text in rust_texts[:3] + ["let x = 'a'; // ünïcödé\n\tfoo(x, 42)?;"]:
        assert theirs(text)["input_ids"] == tokenizer.encode(text).tolist()
        assert theirs.decode(tokenizer.encode(text).tolist()) == text


@pytest.mark.slow
def test_the_command_exports_a_trained_run_and_checks_it(trained_run, tmp_path, capsys):
    _transformers()
    workdir, _, _ = trained_run  # tiny: untied head, squared ReLU, MTP depth 1
    out = tmp_path / "hf"
    main(["--checkpoint", workdir, "--out", str(out), "--format=transformers", "--check"])
    text = capsys.readouterr().out
    assert "left out: MTP modules mtp_0..mtp_0" in text
    assert "argmax equal; 32 greedy tokens equal" in text
    percent = float(re.search(r"\(([0-9.]+)% of the largest logit\)", text).group(1))
    assert percent < 1.0, text  # the bar: within 1% of the largest logit
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    with pytest.raises(SystemExit, match="already holds an export"):
        main(["--checkpoint", workdir, "--out", str(out), "--format=transformers"])
    readme = open(os.path.join(REPO, "README.md")).read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if "AutoModelForCausalLM" in b)  # the README's three lines, as written
    scope: dict = {}
    exec(snippet.replace('"hub/tiny_rust_hf"', repr(str(out))), scope)  # noqa: S102
    assert type(scope["model"]).__name__ == "BitNetForCausalLM"
    assert scope["tokenizer"].bos_token == "<|bos|>"
