"""Byte-level tokenizer: ids 0..255 are bytes, then BOS (document separator), EOS, PAD.

Small and dependency-free for the quick start; the trained BPE tokenizer replaces it.
"""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Lossless bytes <-> ids. `token_bytes[id]` is the UTF-8 length of a token (0 for specials),
    which turns summed nats into bits per byte."""

    name = "bytes"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, data: bytes) -> np.ndarray:  # -> [len(data)] uint16
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> np.ndarray:  # [vocab_size] int32
        return np.array([1] * 256 + [0] * 3, dtype=np.int32)
