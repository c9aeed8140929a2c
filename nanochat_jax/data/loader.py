"""Batches from memory-mapped token shards: BOS-aligned rows, per-host slices, prefetch.

Rows are windows of `seq_len + 1` tokens (inputs + shifted targets) of a shard. They are
BOS-aligned: a row starts at the latest document start inside the previous row (its tail is
repeated, so no token is skipped), and only a document longer than a row is continued
mid-document. Global batch `i` takes rows `i*B .. i*B + B-1` of a per-epoch permutation
seeded by `(seed, epoch)`, so a batch is a pure function of its step: the step *is* the
exact data position a checkpoint stores. With several processes each reads only its own
`B / process_count` rows of every global batch (disjoint, together complete).

`Prefetcher` runs that function in a background thread, `depth` steps ahead, and places
each batch on devices (with a `jax.sharding.Sharding` when given), so the train step never
waits on the host. A thread and not `grain`: a batch is a few memmap slices, cheap enough
that one thread outruns the step, and resume needs no iterator state (BUILD.md).
"""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np

from nanochat_jax.errors import DataError


def row_starts(tokens: np.ndarray, bos_id: int, seq_len: int) -> np.ndarray:
    """BOS-aligned start offsets of `seq_len + 1`-token rows over one shard."""
    bos = np.flatnonzero(np.asarray(tokens) == bos_id)
    starts, s, end = [], 0, len(tokens) - seq_len - 1
    while s <= end:
        starts.append(s)
        # the last document start inside this row's targets, else continue mid-document
        k = np.searchsorted(bos, s + seq_len, side="right") - 1
        s = int(bos[k]) if k >= 0 and bos[k] > s else s + seq_len
    return np.asarray(starts, np.int64)


class BatchSource:
    """`batch(step)` -> this process's `[B / process_count, seq_len + 1]` int32 rows."""

    def __init__(self, shards: list[np.ndarray], bos_id: int, batch_size: int, seq_len: int,
                 seed: int, *, shuffle: bool = True, name: str = "train",
                 process_index: int | None = None, process_count: int | None = None):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise DataError(f"data.batch_size={batch_size} is not divisible by the "
                            f"{self.process_count} processes")
        self.shards = shards
        starts = [row_starts(s, bos_id, seq_len) for s in shards]
        self.rows = np.concatenate([np.stack([np.full(len(st), i), st], 1)
                                    for i, st in enumerate(starts)] or [np.zeros((0, 2))])
        self.rows = self.rows.astype(np.int64)  # [n_rows, 2]: (shard, offset)
        if len(self.rows) < batch_size:
            raise DataError(f"the {name} split has {len(self.rows)} rows of {seq_len + 1} "
                            f"tokens: fewer than one batch of {batch_size}; use more data "
                            f"(data.max_bytes, data.source) or a smaller batch / seq_len")
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.local_batch = batch_size // self.process_count
        self._perm_epoch, self._perm = -1, None

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        return self._perm

    def row_ids(self, step: int) -> np.ndarray:
        """Global row indices of this process's part of batch `step`."""
        first = step * self.batch_size + self.process_index * self.local_batch
        out = np.empty(self.local_batch, np.int64)
        for j in range(self.local_batch):
            epoch, k = divmod(first + j, self.n_rows)
            out[j] = self._order(epoch)[k]
        return out

    def batch(self, step: int) -> np.ndarray:
        out = np.empty((self.local_batch, self.seq_len + 1), np.int32)
        for j, r in enumerate(self.row_ids(step)):
            shard, start = self.rows[r]
            out[j] = self.shards[shard][start:start + self.seq_len + 1]
        return out

    def epoch(self, step: int) -> float:
        """Passes over the split after `step` global batches."""
        return step * self.batch_size / self.n_rows


def to_device(batch: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Place a process-local batch: on the default device, or as the process's slice of a
    global array with `sharding` (multi-host: `make_array_from_process_local_data`)."""
    if sharding is None:
        return jax.device_put(batch)
    return jax.make_array_from_process_local_data(sharding, batch)


class Prefetcher:
    """Iterates `(step, device batch)` from `start`, keeping `depth` batches ready."""

    def __init__(self, source: BatchSource, start: int, depth: int = 2,
                 sharding: jax.sharding.Sharding | None = None):
        self.source, self.sharding = source, sharding
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(start,), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _fill(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                item = (step, to_device(self.source.batch(step), self.sharding))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except Exception as e:  # surfaced to the consumer on its next call
            self._queue.put((None, e))

    def ready(self) -> int:
        """Batches waiting in the queue."""
        return self._queue.qsize()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, jax.Array]:
        step, batch = self._queue.get()
        if step is None:
            raise batch
        return step, batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
