"""Loader: BOS-aligned rows, batches as a function of the step, per-host slices, prefetch."""

import threading

import jax
import numpy as np
import pytest

from nanochat_jax.data.loader import BatchSource, Prefetcher, row_starts, to_device
from nanochat_jax.errors import DataError

BOS = 0


def _stream(doc_lengths, seed=0):
    """[BOS doc BOS doc ...] with document tokens drawn from 1..99."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in doc_lengths:
        parts += [np.array([BOS]), rng.integers(1, 100, size=n)]
    return np.concatenate(parts).astype(np.uint16)


def test_rows_start_at_documents_and_cover_every_token():
    stream = _stream([5, 30, 3, 8, 50, 2, 9, 40, 7])
    t = 16
    starts = row_starts(stream, BOS, t)
    for a, b in zip(starts, starts[1:], strict=False):
        assert b <= a + t  # consecutive rows overlap or touch: no token is skipped
        window = stream[a + 1:a + t + 1]
        if BOS in window:  # a document starts inside the row: the next row starts there
            assert stream[b] == BOS and b == a + 1 + np.flatnonzero(window == BOS)[-1]
        else:  # a long document continues mid-document
            assert b == a + t
    assert starts[-1] + t + 1 > len(stream) - t - 1  # up to the end


def test_batches_are_a_pure_function_of_the_step():
    shards = [_stream([20] * 50, seed=1), _stream([33] * 30, seed=2)]
    a = BatchSource(shards, BOS, batch_size=4, seq_len=16, seed=3)
    b = BatchSource(shards, BOS, batch_size=4, seq_len=16, seed=3)
    for step in (5, 0, 31, 5):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
    assert not np.array_equal(a.batch(0), BatchSource(shards, BOS, 4, 16, seed=4).batch(0))
    assert a.batch(0).shape == (4, 17) and a.batch(0).dtype == np.int32


def test_an_epoch_visits_every_row_once_then_reshuffles():
    data = BatchSource([_stream([15] * 40)], BOS, batch_size=5, seq_len=8, seed=0)
    steps = data.n_rows // 5
    first = np.concatenate([data.row_ids(s) for s in range(steps)])
    assert len(set(first.tolist())) == steps * 5 and first.max() < data.n_rows  # no repeats
    second = np.concatenate([data.row_ids(s) for s in range(steps, 2 * steps)])
    assert not np.array_equal(first, second)


def test_processes_read_disjoint_slices_that_cover_each_global_batch():
    shards = [_stream([12] * 80)]
    whole = BatchSource(shards, BOS, batch_size=8, seq_len=8, seed=7, process_index=0,
                        process_count=1)
    parts = [BatchSource(shards, BOS, batch_size=8, seq_len=8, seed=7, process_index=p,
                         process_count=4) for p in range(4)]
    for step in range(6):
        ids = [p.row_ids(step) for p in parts]
        assert all(len(i) == 2 for i in ids)
        joined = np.concatenate(ids)
        assert len(set(joined.tolist())) == 8
        np.testing.assert_array_equal(joined, whole.row_ids(step))
        np.testing.assert_array_equal(np.concatenate([p.batch(step) for p in parts]),
                                      whole.batch(step))


def test_batch_must_divide_over_processes_and_data_must_fill_a_batch():
    with pytest.raises(DataError, match="divisible"):
        BatchSource([_stream([10] * 10)], BOS, 6, 4, 0, process_index=0, process_count=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchSource([_stream([3])], BOS, 4, 8, 0)


def test_validation_source_is_unshuffled():
    data = BatchSource([_stream([9] * 30)], BOS, 3, 8, seed=0, shuffle=False)
    np.testing.assert_array_equal(data.row_ids(0), [0, 1, 2])
    np.testing.assert_array_equal(data.row_ids(1), [3, 4, 5])


def test_prefetcher_yields_the_same_batches_from_any_start_and_fills_ahead():
    data = BatchSource([_stream([25] * 60)], BOS, 4, 16, seed=5)
    pf = Prefetcher(data, start=3, depth=3)
    try:
        for expect in (3, 4, 5, 6):
            step, batch = next(pf)
            assert step == expect
            np.testing.assert_array_equal(np.asarray(batch), data.batch(expect))
        for _ in range(200):  # the thread refills the queue while nobody consumes
            if pf.ready() == 3:
                break
            threading.Event().wait(0.01)
        assert pf.ready() == 3
    finally:
        pf.close()
    assert not pf._thread.is_alive()


def test_prefetcher_reports_loader_errors_to_the_consumer():
    class Broken(BatchSource):
        def batch(self, step):
            raise DataError("disk gone")

    data = Broken([_stream([25] * 60)], BOS, 4, 16, seed=5)
    pf = Prefetcher(data, start=0)
    with pytest.raises(DataError, match="disk gone"):
        next(pf)
    pf.close()


def test_to_device_places_batches_with_a_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = np.arange(24, dtype=np.int32).reshape(4, 6)
    out = to_device(batch, sharding)
    assert out.sharding == sharding
    np.testing.assert_array_equal(np.asarray(out), batch)
