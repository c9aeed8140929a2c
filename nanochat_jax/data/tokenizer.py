"""Byte-level BPE tokenizers (HF `tokenizers`), trained on the corpus and saved beside it.

Every tokenizer here is byte-level: any input round-trips exactly. Ids 0..6 are the special
tokens (BOS doubles as the document separator; the chat roles are for inference), then the
256 byte symbols, then the learned merges. `vocab_size = 263` means no merges: a plain byte
tokenizer, which is what the quick start uses. The tokenizer's identity is the SHA-256 of
its serialised JSON; checkpoints record it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>")
BYTE_VOCAB = len(SPECIAL_TOKENS) + 256  # smallest vocabulary: specials + every byte
FILENAME = "tokenizer.json"


class BPETokenizer:
    """A trained byte-level BPE: encode/decode, special ids, bytes per token, identity hash."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.bos_id, self.eos_id, self.pad_id = (tok.token_to_id(t) for t in SPECIAL_TOKENS[:3])
        self.vocab_size = tok.get_vocab_size()
        self.sha256 = hashlib.sha256(tok.to_str().encode()).hexdigest()
        self.name = f"bpe{self.vocab_size}"

    def encode(self, text: str | bytes) -> np.ndarray:  # -> [n] int32
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tok.encode(text).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Parallel encoding (the Rust side of `tokenizers` uses every core)."""
        return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def token_bytes(self) -> np.ndarray:  # [vocab_size] int32: UTF-8 bytes a token stands for
        lengths = np.zeros(self.vocab_size, np.int32)
        special = set(SPECIAL_TOKENS)
        for token, i in self.tok.get_vocab().items():
            # byte-level symbols: one printable character per byte
            lengths[i] = 0 if token in special else len(token)
        return lengths

    def identity(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "sha256": self.sha256}

    def save(self, directory: str) -> str:
        path = os.path.join(directory, FILENAME)
        self.tok.save(path)
        return path

    @classmethod
    def load(cls, directory: str) -> BPETokenizer:
        return cls(Tokenizer.from_file(os.path.join(directory, FILENAME)))


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of exactly `vocab_size` ids (>= 263) on an iterator of texts."""
    if vocab_size < BYTE_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} < {BYTE_VOCAB} (special tokens + 256 bytes)")
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)
