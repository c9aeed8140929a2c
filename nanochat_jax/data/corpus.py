"""Text corpus sources: a named built-in source, a directory, or a glob of files.

The quick-start source `python-stdlib` is the Python standard library's own `.py` files
(real text on every machine that has Python). Any other value is a directory (searched
recursively for `extensions`) or a glob, so Rust sources work the same way, e.g.
`--config.data.source=/usr/src/rustc-1.63.0/library --config.data.extensions=.rs`.
Files are split into train/val by a hash of their path, so the split is stable.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path

from nanochat_jax.errors import DataError

# Directories of the standard library that are not the library itself.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}


def list_files(source: str, extensions: tuple[str, ...]) -> list[Path]:
    """The sorted, existing files a source names; DataError when there are none."""
    if source == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py")
                 if not _STDLIB_SKIP.intersection(p.relative_to(root).parts)]
    elif os.path.isdir(source):
        files = [p for p in Path(source).rglob("*") if p.suffix in extensions and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        if not files and not glob.has_magic(source):
            raise DataError(f"data.source {source!r} is neither 'python-stdlib', a directory, "
                            f"nor a glob that matches files")
    if not files:
        raise DataError(f"data.source {source!r} matched no files with extensions "
                        f"{list(extensions)}; for Rust sources install them "
                        f"(`apt-get install rust-src`) and point data.source at the directory")
    return sorted(files)


def is_validation(path: Path, val_fraction: float) -> bool:
    """Stable split: a file is held out when the hash of its path falls in the val slice."""
    digest = hashlib.sha1(path.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < val_fraction


def read_documents(files: list[Path], max_bytes: int) -> list[bytes]:
    """File contents in order, exact duplicates dropped, stopping after `max_bytes` (0: all)."""
    docs, seen, total = [], set(), 0
    for path in files:
        data = path.read_bytes()
        key = hashlib.sha1(data).digest()
        if not data or key in seen:
            continue
        seen.add(key)
        docs.append(data)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    return docs


def load_split(source: str, extensions: tuple[str, ...], val_fraction: float,
               max_bytes: int) -> tuple[list[bytes], list[bytes]]:
    """(train documents, validation documents) of a source."""
    files = list_files(source, extensions)
    val_files = [f for f in files if is_validation(f, val_fraction)]
    train_files = [f for f in files if not is_validation(f, val_fraction)]
    if not val_files or not train_files:
        raise DataError(f"data.source {source!r} has {len(files)} file(s): too few for a "
                        f"train/validation split at data.val_fraction={val_fraction}")
    val_budget = int(max_bytes * val_fraction) if max_bytes else 0
    return read_documents(train_files, max_bytes), read_documents(val_files, val_budget)
