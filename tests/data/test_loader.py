import numpy as np
import pytest

from nanochat_jax.data import corpus
from nanochat_jax.data.loader import PackedBatches, pack_documents
from nanochat_jax.data.tokenizer import ByteTokenizer
from nanochat_jax.errors import DataError


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "fn main() { println!(\"héllo ✓\"); }"
    assert tok.decode(tok.encode(text.encode())) == text
    assert tok.token_bytes[tok.bos_id] == 0 and tok.token_bytes[ord("a")] == 1


def test_packing_puts_a_separator_before_every_document():
    tok = ByteTokenizer()
    stream = pack_documents([b"ab", b"cde"], tok)
    np.testing.assert_array_equal(stream, [tok.bos_id, 97, 98, tok.bos_id, 99, 100, 101])


def test_batches_are_a_pure_function_of_the_step():
    stream = np.arange(1000, dtype=np.uint16)
    a = PackedBatches(stream, batch_size=4, seq_len=9, seed=3)
    b = PackedBatches(stream, batch_size=4, seq_len=9, seed=3)
    for step in (5, 0, 31, 5):  # any order, any instance
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    assert not np.array_equal(a.batch(0), PackedBatches(stream, 4, 9, seed=4).batch(0))


def test_rows_are_contiguous_targets_and_cover_an_epoch_once():
    stream = np.arange(401, dtype=np.uint16)
    data = PackedBatches(stream, batch_size=5, seq_len=8, seed=0)  # 50 rows = 10 batches
    rows = np.concatenate([data.batch(s) for s in range(10)])
    assert rows.shape == (50, 9)
    np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # contiguous windows
    starts = sorted(rows[:, 0].tolist())
    assert starts == list(range(0, 400, 8))  # every row exactly once per epoch


def test_validation_batches_are_unshuffled():
    data = PackedBatches(np.arange(100, dtype=np.uint16), 2, 9, seed=0, shuffle=False)
    np.testing.assert_array_equal(data.batch(0)[:, 0], [0, 9])


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        PackedBatches(np.arange(20, dtype=np.uint16), batch_size=4, seq_len=8, seed=0)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="rust-src"):
        corpus.list_files(str(tmp_path), (".rs",))
    with pytest.raises(DataError, match="neither"):
        corpus.list_files(str(tmp_path / "nope"), (".rs",))


def test_split_is_stable_disjoint_and_holds_out_about_the_fraction(tmp_path):
    for i in range(200):
        (tmp_path / f"f{i}.rs").write_text(f"fn f{i}() {{}}\n")
    files = corpus.list_files(str(tmp_path), (".rs",))
    val = {f for f in files if corpus.is_validation(f, 0.2)}
    assert val == {f for f in files if corpus.is_validation(f, 0.2)}
    assert 20 <= len(val) <= 60
    train, held = corpus.load_split(str(tmp_path), (".rs",), 0.2, 0)
    assert len(train) + len(held) == 200 and not set(train) & set(held)


def test_duplicate_files_are_read_once(tmp_path):
    for name in ("a.rs", "b.rs"):
        (tmp_path / name).write_text("fn same() {}\n")
    docs = corpus.read_documents(corpus.list_files(str(tmp_path), (".rs",)), 0)
    assert docs == [b"fn same() {}\n"]


def test_python_stdlib_source_is_real_text():
    files = corpus.list_files("python-stdlib", (".py",))
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
