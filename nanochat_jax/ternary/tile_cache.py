"""The kernel's tilings in use: a cache in memory and on disk, looked up while tracing.

A traced product (kernel.py) asks `lookup_blocks` for its shape's tiling: the tuned one from
memory or the cache file (`tune_cache_path()`), else the tiling's untuned default, the shape
then noted as pending. Nothing is timed here, so a lookup is safe inside a trace; tuning.py
times the pending shapes on concrete arrays before the step is compiled and records the
winners here (`adopt`, `save`). `lookups_in` traces a step abstractly to list the keys it
looks up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from nanochat_jax.ternary.tiling import Blocks, Tiling, as_blocks, next_pow2

TUNE_CACHE_ENV = "NANOCHAT_TUNE_CACHE"

_TUNED: dict[str, Blocks] = {}
_PENDING: dict[str, tuple[Tiling, int, int, int, str]] = {}  # key -> (tiling, m, k4, n_p, dtype)
_LOOKED_UP: set[str] = set()  # every key looked up since `lookups_in` cleared it


def tune_cache_path() -> str:
    """The tuning cache file: $NANOCHAT_TUNE_CACHE, else kernel_tiles.json in
    $NANOCHAT_CACHE (default ~/.cache/nanochat_jax). Keyed by device kind and shape, so one
    file serves every run, model and GPU/TPU kind of a user."""
    if os.environ.get(TUNE_CACHE_ENV):
        return os.environ[TUNE_CACHE_ENV]
    root = os.environ.get("NANOCHAT_CACHE", os.path.expanduser("~/.cache/nanochat_jax"))
    return os.path.join(root, "kernel_tiles.json")


def cache_key(device_kind: str, lowering: str, m: int, k4: int, n_p: int, dtype) -> str:
    """Device kind, lowering ("mosaic", "triton", "interpret": a test's interpret-mode tiles
    never stand for a compiled kernel's), row bucket, packed shape, activation dtype."""
    return (f"{device_kind}|{lowering}|m{min(next_pow2(m), 1024)}|k4{k4}|n{n_p}|"
            f"{jnp.dtype(dtype).name}")


def _load_disk_cache(path: str) -> dict[str, Blocks]:
    """The tilings in a cache file ({} when it is missing or unreadable); entries that are
    not tilings are dropped."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    tiles = {}
    for key, value in entries.items() if isinstance(entries, dict) else ():
        try:
            tiles[key] = as_blocks(value)
        except (TypeError, ValueError):
            continue
    return tiles


def save(path: str, key: str, blocks: Blocks) -> None:
    """Add one entry to the cache file, written to a temporary name and renamed (another
    process reading it never sees half a file). Raises OSError when it cannot."""
    disk = _load_disk_cache(path)
    disk[key] = blocks
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump({k: list(v) for k, v in sorted(disk.items())}, f, indent=1)
    os.replace(temporary, path)


def lookup_blocks(tiling: Tiling, device_kind: str, m: int, k4: int, n_p: int, dtype,
                  cache_path: str | None = None, lowering: str | None = None) -> Blocks:
    """The tuned tiling for this shape (memory, then the JSON file `cache_path`, default
    `tune_cache_path()`), else the tiling's default, the shape noted in `pending()`.
    `lowering`: the tiling's own (default) or "interpret". Safe inside a trace: nothing is
    timed here."""
    key = cache_key(device_kind, lowering or tiling.lowering, m, k4, n_p, dtype)
    _LOOKED_UP.add(key)
    if key not in _TUNED:
        disk = _load_disk_cache(cache_path or tune_cache_path())
        if key in disk:
            _TUNED[key] = disk[key]
    if key in _TUNED and tiling.accepts(_TUNED[key], k4, n_p):  # (a stale file: retune)
        return _TUNED[key]
    _PENDING[key] = (tiling, m, k4, n_p, jnp.dtype(dtype).name)
    return tiling.default(m, k4, n_p, dtype)


def tuned(key: str) -> Blocks | None:
    """The tiling in use for a cache key (None: not tuned, nor read from the cache)."""
    return _TUNED.get(key)


def pending() -> list[str]:
    """Cache keys of shapes traced with a default tiling since the last `tune_pending`."""
    return sorted(_PENDING)


def pending_shape(key: str) -> tuple[Tiling, int, int, int, str]:
    """(tiling, m, k4, n_p, dtype name) of a pending key: what its tuner times."""
    return _PENDING[key]


def adopt(tiles: dict[str, Blocks]) -> None:
    """Use these tilings (cache key -> blocks): tuned in this process (tuning.py), or
    elsewhere, by another process of the same job (train/step.py `tune_kernel_tiles`)."""
    for key, blocks in tiles.items():
        _TUNED[key] = as_blocks(blocks)
        _PENDING.pop(key, None)


def lookups_in(fn: Callable, *args) -> tuple[list[str], list[str]]:
    """Trace `fn(*args)` abstractly and afresh (args may be `jax.ShapeDtypeStruct`s; a
    jitted function is traced through its `__wrapped__`, so its own cache keeps no
    default-tiled trace; a new closure, so no cached trace skips the lookups).
    -> (the cache keys of every kernel product it runs, sorted: the same list in every
    process that traces the same step; those of them with no tiling yet)."""
    inner = getattr(fn, "__wrapped__", fn)
    _LOOKED_UP.clear()
    jax.eval_shape(lambda *a: inner(*a), *args)
    keys = sorted(_LOOKED_UP)
    return keys, [k for k in keys if k in _PENDING]
