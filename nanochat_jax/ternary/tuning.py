"""Kernel tuning: time the candidate tilings of a shape on the local device, keep the fastest.

A step is traced once abstractly (`tile_cache.lookups_in`), which notes the shapes the
cache has no tiling for; `tune_pending` then times those on concrete random operands and
records each winner in the cache (memory and file), and only then is the step compiled.
Nothing here runs inside a trace: there it would be staged, not timed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.ternary import kernel, tile_cache
from nanochat_jax.ternary.tiling import Blocks, Tiling, as_blocks, gpu_of

# Triton's compiler parameters the tuner tries on its best tiling (num_warps, num_stages)
TRITON_PARAMS = tuple((warps, stages) for warps in (4, 8) for stages in (2, 3, 4))


def _inside_trace() -> bool:
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def local_lowering(tiling: Tiling) -> str:
    """How this host's first device runs `tiling`'s kernel: compiled where the tiling is its
    platform's (Mosaic on a TPU, Triton on a GPU), else in interpret mode."""
    platform = jax.devices()[0].platform
    return tiling.lowering if kernel.TILINGS.get(platform) is tiling else "interpret"


def tune_shape(tiling: Tiling, m: int, k4: int, n_p: int, dtype, *,
               candidates: list[Blocks] | None = None, cache_path: str | None = None,
               repeats: int = 3, say: Callable[[str], None] = print) -> Blocks:
    """Time every candidate tiling of one shape on the local device, with concrete random
    operands, and record the fastest in memory and in `cache_path` (default
    `tile_cache.tune_cache_path()`). On a GPU the candidates are those that fit its shared
    memory (tiling.triton_shared_memory), and the winner is then timed with the other Triton
    compiler parameters (`TRITON_PARAMS`). A candidate that fails to compile or run anyway
    is skipped with one line to `say`. Refuses to run inside a trace (it would be staged,
    not run)."""
    if _inside_trace():
        raise RuntimeError("kernel tuning runs on concrete arrays before a step is traced: "
                           "call tune_pending() before jax.jit(...)(...), not inside it")
    device = jax.devices()[0]
    lowering = local_lowering(tiling)
    gpu = gpu_of(device) if lowering == "triton" else None
    key = tile_cache.cache_key(device.device_kind, lowering, m, k4, n_p, dtype)
    candidates = [as_blocks(b) for b in candidates] if candidates else tiling.candidates(
        m, k4, n_p, dtype, gpu)
    if not candidates:
        raise ValueError(f"no {tiling.lowering} tiling of the packed shape [{k4}, {n_p}] fits "
                         f"this device")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-127, 128, size=(m, 4 * k4)), dtype)
    codes = jnp.asarray(rng.integers(0, 256, size=(k4, n_p)), jnp.uint8)
    int8_dots = device.device_kind not in kernel.NO_INT8_MXU
    timings: dict[Blocks, float] = {}
    failures: list[str] = []

    def time_one(blocks: Blocks) -> None:
        run = functools.partial(kernel.pallas_matmul, x, codes, blocks, lowering, int8_dots)
        try:
            run().block_until_ready()  # compile
            started = time.perf_counter()
            for _ in range(repeats):
                run().block_until_ready()
        except Exception as error:  # a tiling the compiler or the device refuses
            failures.append(_first_line(error))
            say(f"kernel tiling {tuple(blocks)} of {key} skipped: {failures[-1]}")
            return
        timings[blocks] = (time.perf_counter() - started) / repeats

    for blocks in candidates:
        time_one(blocks)
    if not timings:
        raise RuntimeError(f"no tiling of {key} compiled on {device.device_kind} "
                           f"({len(candidates)} tried; the first error: {failures[0]})")
    best = min(timings, key=timings.get)
    if lowering == "triton":
        for warps, stages in TRITON_PARAMS:
            variant = best._replace(num_warps=warps, num_stages=stages)
            if variant not in timings and tiling.fits(variant, dtype, gpu):
                time_one(variant)
        best = min(timings, key=timings.get)
    tile_cache.adopt({key: best})
    path = cache_path or tile_cache.tune_cache_path()
    try:
        tile_cache.save(path, key, best)
    except OSError as error:  # a read-only or full home: this process keeps the tiling
        say(f"kernel tiling {key}: not saved to {path} ({_first_line(error)}); the next "
            f"process tunes it again")
    return best


def tune_pending(*, keys: list[str] | None = None, cache_path: str | None = None,
                 repeats: int = 3, say: Callable[[str], None] = print) -> dict[str, Blocks]:
    """Tune every pending shape of the local device's kind (see `tile_cache.lookup_blocks`),
    or only those of `keys`: trace the step once (`tile_cache.lookups_in`), call this, then
    jit the step. -> {key: blocks}."""
    kind = jax.devices()[0].device_kind
    done = {}
    for key in tile_cache.pending():
        if key.startswith(kind + "|") and (keys is None or key in keys):
            tiling, m, k4, n_p, dtype = tile_cache.pending_shape(key)
            started = time.perf_counter()
            done[key] = tune_shape(tiling, m, k4, n_p, dtype, cache_path=cache_path,
                                   repeats=repeats, say=say)
            say(f"kernel tiling {key}: {tuple(done[key])} "
                f"({time.perf_counter() - started:.1f} s)")
    return done


def tune_for(fn: Callable, *args, cache_path: str | None = None,
             say: Callable[[str], None] = print) -> dict[str, Blocks]:
    """Tune the kernel for every product `fn(*args)` runs that has no tiling yet, before
    `fn` is compiled; nothing where the kernel is not compiled (CPU). One process; a
    multi-process job uses train/step.py `tune_kernel_tiles`. -> {cache key: tiling}."""
    if kernel.resolve_impl("auto") != "pallas":
        return {}
    _, pending_keys = tile_cache.lookups_in(fn, *args)
    if not pending_keys:
        return {}
    return tune_pending(keys=pending_keys, cache_path=cache_path, say=say)
