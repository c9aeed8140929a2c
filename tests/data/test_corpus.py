"""Corpus builder: dedup, filters, a stable split, shards that decode to the sources."""

import glob
import json

import numpy as np
import pytest

from nanochat_jax.cli import corpus as corpus_command
from nanochat_jax.data import corpus
from nanochat_jax.errors import DataError


def _write_crate(root, n=60):
    for i in range(n):
        (root / f"m{i}.rs").write_text(f"pub fn f{i}(x: u32) -> u32 {{ x * {i} + 1 }} // é{i}\n")
    (root / "dup.rs").write_text((root / "m0.rs").read_text())  # identical to m0.rs
    (root / "big.rs").write_text("// " + "x" * 5000 + "\n")
    (root / "empty.rs").write_text("  \n")
    (root / "notes.txt").write_text("not rust\n")


def _spec(root, **kw):
    return corpus.BuildSpec(source=str(root), extensions=(".rs",), max_file_bytes=1000,
                            val_fraction=0.2, vocab_size=300, **kw)


def test_build_dedups_filters_and_splits(tmp_path):
    src = tmp_path / "crate"
    src.mkdir()
    _write_crate(src)
    m = corpus.build(_spec(src), str(tmp_path / "out"))
    assert m["files_found"] == 63  # .txt not listed
    assert m["duplicates"] == 1 and m["too_large"] == 1
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["files"] + val["files"] == 60 and 3 <= val["files"] <= 25
    assert m["tokenizer"]["vocab_size"] == 300 and m["dtype"] == "uint16"
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saved["content_sha256"] == m["content_sha256"]


def test_shards_decode_back_to_the_source_files(tmp_path):
    src = tmp_path / "crate"
    src.mkdir()
    _write_crate(src)
    c = corpus.ensure(_spec(src), str(tmp_path / "out"))
    tok = c.tokenizer
    texts = set()
    for split in ("train", "val"):
        (shard,) = c.shards(split)
        assert shard[0] == tok.bos_id
        cuts = np.flatnonzero(np.asarray(shard) == tok.bos_id).tolist() + [len(shard)]
        texts |= {tok.decode(shard[a + 1:b]) for a, b in zip(cuts, cuts[1:], strict=False)}
        assert len(cuts) - 1 == c.manifest["splits"][split]["docs"]
    originals = {p.read_text() for p in src.glob("m*.rs")}
    assert texts == originals


def test_rebuilding_gives_the_same_split_and_content(tmp_path):
    src = tmp_path / "crate"
    src.mkdir()
    _write_crate(src)
    a = corpus.build(_spec(src), str(tmp_path / "a"))
    b = corpus.build(_spec(src), str(tmp_path / "b"))
    assert a["content_sha256"] == b["content_sha256"]
    assert a["splits"]["val"]["files"] == b["splits"]["val"]["files"]


def test_shards_are_cut_at_document_boundaries(tmp_path):
    src = tmp_path / "crate"
    src.mkdir()
    _write_crate(src)
    c = corpus.ensure(_spec(src, shard_tokens=200), str(tmp_path / "out"))
    shards = c.shards("train")
    assert len(shards) > 2
    assert all(s[0] == c.tokenizer.bos_id and len(s) <= 200 for s in shards)
    assert sum(len(s) for s in shards) == c.manifest["splits"]["train"]["tokens"]


def test_missing_named_source_says_how_to_install(monkeypatch):
    missing = corpus.NamedSource(("/nonexistent/rustc-*",), (".rs",), (), "apt-get install x")
    monkeypatch.setitem(corpus.SOURCES, "rust-src", missing)
    with pytest.raises(DataError, match="apt-get install x"):
        corpus.list_files("rust-src", (".rs",))


def test_unknown_source_and_empty_directory_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="named source"):
        corpus.list_files(str(tmp_path / "nope"), (".rs",))
    with pytest.raises(DataError, match="rust-src"):
        corpus.list_files(str(tmp_path), (".rs",))


def test_cache_key_changes_with_every_setting(tmp_path):
    base = _spec(tmp_path)
    keys = {base.key(), _spec(tmp_path, max_bytes=10).key(),
            corpus.BuildSpec(source=str(tmp_path), vocab_size=301).key()}
    assert len(keys) == 3


def test_builder_command_refuses_to_overwrite(tmp_path, capsys):
    src = tmp_path / "crate"
    src.mkdir()
    _write_crate(src)
    out = tmp_path / "out"
    argv = [f"--source={src}", f"--out={out}", "--vocab_size=300", "--max_file_bytes=1000",
            "--val_fraction=0.2"]
    corpus_command.main(argv)
    assert "bytes/token" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds a corpus"):
        corpus_command.main(argv)


@pytest.mark.skipif(not glob.glob("/usr/src/rustc-*"),
                    reason="needs Debian's rust-src (apt-get install rust-src); .ci/run "
                           "installs it")
def test_real_rust_src_corpus(tmp_path):
    spec = corpus.BuildSpec(source="rust-src", max_bytes=3_000_000, vocab_size=2048)
    c = corpus.ensure(spec, str(tmp_path / "rust"))
    train, val = c.manifest["splits"]["train"], c.manifest["splits"]["val"]
    assert train["bytes"] >= 3_000_000 and val["files"] > 0
    bytes_per_token = val["bytes"] / (val["tokens"] - val["docs"])
    assert 2.5 < bytes_per_token < 5.0, bytes_per_token  # a 2k BPE on Rust: ~3 bytes/token
    (shard,) = c.shards("val")
    text = c.tokenizer.decode(shard[:5000])
    assert text.count("fn ") > 5 and "impl" in text
