"""Byte-level BPE: exact round trips on Rust, specials, bytes per token, identity."""

import numpy as np
import pytest

from nanochat_jax.data.tokenizer import BYTE_VOCAB, SPECIAL_TOKENS, BPETokenizer, train_tokenizer

RUST = [
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "pub struct Point<T> { x: T, y: T }\nimpl<T: Copy> Point<T> { fn x(&self) -> T { self.x } }\n",
    "// ünïcödé ✓ 日本語 🦀\nlet s: &str = \"naïve café\";\n",
    "match x {\n\t\tSome(v) => v,\n\t\tNone    =>   0,\n}\n\n\n    \t  \n",
    "#[derive(Debug, Clone)]\nenum E { A(u8), B { f: f64 } }\r\nconst C: u32 = 0xFF_FF;\n",
]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(iter(RUST * 20), vocab_size=400)


@pytest.mark.parametrize("text", RUST + ["", " ", "\x00\x01 control bytes \x7f"])
def test_round_trip_is_exact_on_rust_snippets(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_merges_shorten_rust_and_bytes_only_does_not(bpe):
    plain = train_tokenizer(iter(RUST), vocab_size=BYTE_VOCAB)
    text = RUST[1]
    assert plain.vocab_size == BYTE_VOCAB == len(SPECIAL_TOKENS) + 256
    assert len(plain.encode(text)) == len(text.encode())  # one token per byte
    assert len(bpe.encode(text)) < 0.7 * len(text.encode())


def test_vocab_size_is_exact_and_specials_come_first(bpe):
    assert bpe.vocab_size == 400
    assert [bpe.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)


def test_token_bytes_sum_to_the_utf8_length(bpe):
    for text in RUST:
        ids = bpe.encode(text)
        assert int(bpe.token_bytes[ids].sum()) == len(text.encode())
    assert bpe.token_bytes[bpe.bos_id] == 0


def test_encode_batch_equals_encode(bpe):
    for a, b in zip(bpe.encode_batch(RUST), RUST, strict=True):
        np.testing.assert_array_equal(a, bpe.encode(b))


def test_save_load_keeps_identity(bpe, tmp_path):
    bpe.save(str(tmp_path))
    loaded = BPETokenizer.load(str(tmp_path))
    assert loaded.identity() == bpe.identity()
    other = train_tokenizer(iter(RUST * 20), vocab_size=401)
    assert other.sha256 != bpe.sha256


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="263"):
        train_tokenizer(iter(RUST), vocab_size=100)
