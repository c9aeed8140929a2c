"""Pack documents into fixed-length rows and serve deterministic, resumable batches.

Documents are joined into one token stream, each prefixed by BOS (the separator), and cut
into non-overlapping rows of `seq_len + 1` tokens (inputs and shifted targets). Training
batches draw rows from a fresh permutation each epoch, seeded by (seed, epoch): batch `i` is a
pure function of `i`, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

from nanochat_jax.errors import DataError


def pack_documents(docs: list[bytes], tokenizer) -> np.ndarray:
    """[BOS doc0 BOS doc1 ...] as one 1-D uint16/uint32 array."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    parts = []
    for doc in docs:
        parts.append(np.array([tokenizer.bos_id], dtype=dtype))
        parts.append(tokenizer.encode(doc).astype(dtype))
    return np.concatenate(parts) if parts else np.zeros((0,), dtype)


class PackedBatches:
    """Rows of `seq_len + 1` tokens from a packed stream; `batch(step)` -> [B, seq_len + 1]."""

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 shuffle: bool = True, name: str = "train"):
        self.n_rows = (len(stream) - 1) // seq_len
        if self.n_rows < batch_size:
            raise DataError(f"the {name} split has {len(stream):,} tokens = {self.n_rows} rows "
                            f"of {seq_len + 1}: fewer than one batch of {batch_size}; use a "
                            f"bigger data.source or data.max_bytes, or a smaller batch")
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.seed, self.shuffle = seed, shuffle
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> np.ndarray:
        """The batch for a given step: rows step*B .. step*B + B-1 of the epoch orderings."""
        out = np.empty((self.batch_size, self.seq_len + 1), np.int32)
        for j in range(self.batch_size):
            epoch, k = divmod(step * self.batch_size + j, self.n_rows)
            start = int(self._order(epoch)[k]) * self.seq_len
            out[j] = self.stream[start:start + self.seq_len + 1]
        return out

    def epoch(self, step: int) -> float:
        """Fractional number of passes over the data after `step` batches."""
        return step * self.batch_size / self.n_rows
