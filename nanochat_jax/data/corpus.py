"""Build a tokenized corpus from source files: dedup, filter, split, train BPE, write shards.

The command is `python -m nanochat_jax.cli.corpus`; `ensure` builds one on first use.

Sources: `rust-src` (Debian's Rust sources, `/usr/src/rustc-*`, without the compiler test
suite `src/test`), `rust-src-full` (with it), `librust` (Debian `librust-*-dev` crate sources
under `/usr/share/cargo/registry`), `python-stdlib` (the quick-start text present on every
machine with Python), or any directory (searched for `extensions`) or glob.

Output in DIR (`build(spec, DIR)`): `tokenizer.json`, `{train,val}_NNN.bin` token shards
(uint16 when the vocab fits, else uint32; each document is BOS + tokens), and
`manifest.json` with file/byte/token counts, per-shard SHA-256 and a content hash of the
whole corpus. Files are split into train/val by a hash of their path relative to the source
root, so the split is stable.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nanochat_jax.data.tokenizer import BPETokenizer, train_tokenizer
from nanochat_jax.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class NamedSource:
    roots: tuple[str, ...]  # globs of root directories
    extensions: tuple[str, ...]
    skip: tuple[str, ...]  # relative directory prefixes to leave out
    install_hint: str


SOURCES = {
    "rust-src": NamedSource(("/usr/src/rustc-*",), (".rs",), ("src/test/", "debian/"),
                            "install Debian's rust-src: `apt-get install rust-src` (or "
                            "`apt-get download rust-src && dpkg-deb -x rust-src_*.deb DIR` "
                            "and pass --source=DIR/usr/src)"),
    "rust-src-full": NamedSource(("/usr/src/rustc-*",), (".rs",), ("debian/",),
                                 "install Debian's rust-src: `apt-get install rust-src`"),
    "librust": NamedSource(("/usr/share/cargo/registry",), (".rs",), (),
                           "extract Debian librust-*-dev packages: `apt-get download "
                           "librust-<crate>-dev && dpkg-deb -x <deb> /` (do not apt-get "
                           "install them all: they pull in large toolchains)"),
    "python-stdlib": NamedSource((sysconfig.get_paths()["stdlib"],), (".py",),
                                 ("site-packages/", "test/", "idlelib/", "lib2to3/"),
                                 "it is part of every Python installation"),
}


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """Everything that determines a corpus's content (its cache key)."""

    source: str = "rust-src"
    extensions: tuple[str, ...] = (".rs",)  # for directory sources
    max_file_bytes: int = 100_000  # larger files (generated tables, vendored blobs) dropped
    val_fraction: float = 0.05
    max_bytes: int = 0  # stop reading training text after this many bytes (0: all)
    vocab_size: int = 32768  # BYTE_VOCAB (263): a plain byte tokenizer, no merges
    shard_tokens: int = 50_000_000

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        name = os.path.basename(self.source.rstrip("/")) or "corpus"
        return f"{name}-v{self.vocab_size}-{hashlib.sha256(blob).hexdigest()[:10]}"


def default_dir(spec: BuildSpec) -> str:
    """Where a corpus is cached when no directory is named: $NANOCHAT_CACHE or ~/.cache."""
    root = os.environ.get("NANOCHAT_CACHE", os.path.expanduser("~/.cache/nanochat_jax"))
    return os.path.join(root, "corpora", spec.key())


def list_files(source: str, extensions: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(sorted files, their roots) for a named source, a directory or a glob."""
    if source in SOURCES:
        named = SOURCES[source]
        roots = [Path(p) for r in named.roots for p in sorted(glob.glob(r)) if os.path.isdir(p)]
        if not roots:
            raise DataError(f"data source {source!r} is not on this machine: {named.install_hint}")
        pairs = [(p, root) for root in roots for p in root.rglob("*")
                 if p.suffix in named.extensions and p.is_file()
                 and not p.relative_to(root).as_posix().startswith(named.skip)]
    elif os.path.isdir(source):
        root = Path(source)
        pairs = [(p, root) for p in root.rglob("*") if p.suffix in extensions and p.is_file()]
    else:
        pairs = [(Path(p), Path(p).parent) for p in glob.glob(source, recursive=True)
                 if os.path.isfile(p)]
        if not pairs and not glob.has_magic(source):
            raise DataError(f"data source {source!r} is not a named source "
                            f"({', '.join(SOURCES)}), a directory, or a glob that matches files")
    if not pairs:
        raise DataError(f"data source {source!r} has no files with extensions "
                        f"{list(extensions)}; for Rust: {SOURCES['rust-src'].install_hint}")
    pairs.sort()
    return [p for p, _ in pairs], [r for _, r in pairs]


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Stable split: a file is held out when the hash of its relative path is in the slice."""
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < val_fraction


def read_documents(spec: BuildSpec) -> tuple[dict[str, list[str]], dict]:
    """{'train': texts, 'val': texts} after dedup and filters, plus the file statistics."""
    files, roots = list_files(spec.source, spec.extensions)
    docs: dict[str, list[str]] = {"train": [], "val": []}
    stats = {"files_found": len(files), "duplicates": 0, "too_large": 0, "empty": 0,
             "train": {"files": 0, "bytes": 0}, "val": {"files": 0, "bytes": 0}}
    seen: set[bytes] = set()
    val_budget = int(spec.max_bytes * spec.val_fraction)
    for path, root in zip(tqdm(files, desc="read", unit="file", leave=False), roots, strict=True):
        size = path.stat().st_size
        if size > spec.max_file_bytes:
            stats["too_large"] += 1
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).digest()
        if not data.strip():
            stats["empty"] += 1
            continue
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        split = "val" if is_validation(path.relative_to(root).as_posix(),
                                       spec.val_fraction) else "train"
        budget = val_budget if split == "val" else spec.max_bytes
        if budget and stats[split]["bytes"] >= budget:
            continue
        docs[split].append(data.decode("utf-8", errors="replace"))
        stats[split]["files"] += 1
        stats[split]["bytes"] += len(data)
    for split in ("train", "val"):
        if not docs[split]:
            raise DataError(f"data source {spec.source!r}: no {split} files after filtering "
                            f"({stats}); use more files or another val_fraction")
    return docs, stats


def _write_split(docs: list[str], tok: BPETokenizer, split: str, out: str,
                 shard_tokens: int, dtype) -> dict:
    """Tokenize documents in parallel batches; write BOS-separated shards of <= shard_tokens."""
    shards, buf, buf_len, total = [], [], 0, 0

    def flush():
        nonlocal buf, buf_len
        if not buf:
            return
        arr = np.concatenate(buf).astype(dtype)
        name = f"{split}_{len(shards):03d}.bin"
        arr.tofile(os.path.join(out, name))
        shards.append({"file": name, "tokens": int(arr.size),
                       "sha256": hashlib.sha256(arr.tobytes()).hexdigest()})
        buf, buf_len = [], 0

    bos = np.array([tok.bos_id], np.int32)
    batch = 256
    with tqdm(total=len(docs), desc=f"tokenize {split}", unit="file", leave=False) as bar:
        for i in range(0, len(docs), batch):
            for ids in tok.encode_batch(docs[i:i + batch]):
                if buf_len + len(ids) + 1 > shard_tokens:
                    flush()
                buf += [bos, ids]
                buf_len += len(ids) + 1
                total += len(ids) + 1
            bar.update(len(docs[i:i + batch]))
    flush()
    return {"docs": len(docs), "tokens": total, "shards": shards}


def build(spec: BuildSpec, out: str) -> dict:
    """Build the corpus into `out` (atomically: a temp dir renamed at the end); the manifest."""
    docs, stats = read_documents(spec)
    print(f"corpus {spec.source}: {stats['train']['files']:,} train / {stats['val']['files']:,} "
          f"val files, {stats['train']['bytes'] / 1e6:.1f} / {stats['val']['bytes'] / 1e6:.1f} "
          f"MB ({stats['duplicates']} duplicates, {stats['too_large']} > "
          f"{spec.max_file_bytes:,} B dropped); training a {spec.vocab_size}-id BPE ...")
    tok = train_tokenizer(iter(docs["train"]), spec.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        tok.save(tmp)
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        splits = {s: {**stats[s], **_write_split(docs[s], tok, s, tmp, spec.shard_tokens,
                                                 dtype)} for s in ("train", "val")}
        content = hashlib.sha256("".join(sh["sha256"] for s in ("train", "val")
                                         for sh in splits[s]["shards"]).encode()).hexdigest()
        manifest = {"format": FORMAT_VERSION, "spec": dataclasses.asdict(spec),
                    "tokenizer": tok.identity(), "dtype": np.dtype(dtype).name,
                    "files_found": stats["files_found"], "duplicates": stats["duplicates"],
                    "too_large": stats["too_large"], "splits": splits,
                    "content_sha256": content}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same corpus first
            if not os.path.exists(os.path.join(out, MANIFEST)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


@dataclasses.dataclass
class Corpus:
    """A built corpus on disk: manifest, tokenizer, and memory-mapped token shards."""

    directory: str
    manifest: dict
    tokenizer: BPETokenizer

    @classmethod
    def open(cls, directory: str) -> Corpus:
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise DataError(f"{directory} holds no corpus ({MANIFEST} missing); build one with "
                            f"`python -m nanochat_jax.cli.corpus --source=... --out={directory}`")
        with open(path) as f:
            manifest = json.load(f)
        return cls(directory, manifest, BPETokenizer.load(directory))

    def verify(self) -> dict:
        """Check the tokenizer and every shard against the manifest (size, then SHA-256);
        DataError naming the first file that does not match. -> {'shards', 'bytes'}."""
        if self.tokenizer.identity() != self.manifest["tokenizer"]:
            raise DataError(f"{self.directory}: tokenizer.json is not the tokenizer this corpus "
                            f"was built with (manifest {self.manifest['tokenizer']}, file "
                            f"{self.tokenizer.identity()}); {self._rebuild_hint()}")
        itemsize = np.dtype(self.manifest["dtype"]).itemsize
        shards = [s for split in ("train", "val") for s in self.manifest["splits"][split]["shards"]]
        total = 0
        for shard in shards:
            path = os.path.join(self.directory, shard["file"])
            want = shard["tokens"] * itemsize
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != want:
                found = "missing" if size is None else f"{size:,} bytes"
                raise DataError(f"data shard {path} is {found}, the manifest says {want:,} "
                                f"bytes; {self._rebuild_hint()}")
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                raise DataError(f"data shard {path} does not match its manifest hash (sha256 "
                                f"{digest.hexdigest()[:16]}..., manifest "
                                f"{shard['sha256'][:16]}...): it changed after the corpus was "
                                f"built; {self._rebuild_hint()}")
            total += size
        return {"shards": len(shards), "bytes": total}

    def _rebuild_hint(self) -> str:
        return (f"delete {self.directory} and re-run to rebuild it from "
                f"{self.manifest['spec']['source']!r}, or restore the file")

    def shards(self, split: str) -> list[np.ndarray]:
        """Read-only memory maps of a split's shards (1-D token arrays)."""
        return [np.memmap(os.path.join(self.directory, s["file"]), dtype=self.manifest["dtype"],
                          mode="r") for s in self.manifest["splits"][split]["shards"]]


def ensure(spec: BuildSpec, directory: str | None = None) -> Corpus:
    """Open the corpus for `spec` at `directory` (default: the cache), building it if absent."""
    directory = directory or default_dir(spec)
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        build(spec, directory)
    return Corpus.open(directory)

