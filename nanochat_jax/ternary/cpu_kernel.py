"""The CPU ternary matmul (cpu_kernel.cc): built for this host on first use, called via XLA FFI.

    acc = cpu_kernel.matmul(x, tiles)  # int8 [M, K], uint8 [NB, K4/4, 256] -> int32 [M, 64 NB]

XLA:CPU multiplies int8 and bf16 matrices several times slower than float32 ones and has no
2-bit format, so batch-1 decoding from packed weights was bound by float32 weight traffic
(BUILD.md#the-ternary-kernel, "CPU decode kernel", has the measurements). `cpu_kernel.cc` is
a small XLA FFI handler that reads the packed weights at 2 bits each, in the order it
streams them (CPU tiles, `packing.cpu_tiles`), and multiplies them with int8 activations
using the host's u8 x s8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AVX2; a
portable loop elsewhere), sharing long calls with XLA's intra-op thread pool.

The library is compiled with the system C++ compiler (`$CXX`, else `c++`) and
`-march=native` against the FFI headers jaxlib ships (`jax.ffi.include_dir()`), once per
host, source and jaxlib version, into `$NANOCHAT_NATIVE_CACHE` (default
`~/.cache/nanochat_jax/native`); a build takes a few seconds and prints one line. Without
a compiler, or with `NANOCHAT_NATIVE=0`, `available()` is False and callers keep XLA's own
integer dot (kernel.py's reference): slower, same numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp

from nanochat_jax.ternary.packing import TILE_COLUMNS

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernel.cc")
TARGET = "nanochat_ternary_matmul"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
CACHE_ENV = "NANOCHAT_NATIVE_CACHE"
SWITCH_ENV = "NANOCHAT_NATIVE"  # "0": never build or use the kernel

_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL | None once loading was tried, "why": str if None


def _host_id() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    lines: list[str] = []
    with contextlib.suppress(OSError):  # no /proc (macOS): the machine name must do
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    flags = sorted({line for line in lines if line.startswith(("flags", "model name", "Features"))})
    return f"{platform.machine()} {platform.processor()} {' '.join(flags)}"


def _library_path() -> str:
    with open(SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source + " ".join((_host_id(), jax.__version__, *FLAGS,
                                              jax.ffi.include_dir())).encode()).hexdigest()[:16]
    cache = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "nanochat_jax", "native")
    return os.path.join(cache, f"ternary_matmul-{digest}.so")


def _build(path: str) -> None:
    """Compile SOURCE into `path` (atomically: concurrent builders each write their own
    temporary file and rename it)."""
    compiler = os.environ.get("CXX", "c++")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    print(f"nanochat_jax: building the CPU ternary kernel ({compiler}, -march=native) into "
          f"{os.path.dirname(path)}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load() -> ctypes.CDLL | None:
    """The kernel library, built if this host has none yet, and registered with XLA; None
    (and `why()` says why) when it cannot be: no compiler, a failed build, or switched off."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, ""
        if os.environ.get(SWITCH_ENV, "1") == "0":
            why = f"{SWITCH_ENV}=0"
        else:
            try:
                path = _library_path()
                if not os.path.exists(path):
                    _build(path)
                lib = ctypes.cdll.LoadLibrary(path)
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NanochatTernaryMatmul),
                                            platform="cpu")
                lib.NanochatTernaryPath.restype = ctypes.c_char_p
            except (OSError, AttributeError) as e:  # no compiler / failed build / bad library
                lib, why = None, str(e)
                print(f"nanochat_jax: no CPU ternary kernel ({why.splitlines()[0]}); using "
                      f"XLA's integer dot", file=sys.stderr, flush=True)
        _state.update(lib=lib, why=why)
        return lib


def available() -> bool:
    """True when the kernel is (or can now be) built and registered for this host."""
    return load() is not None


def why() -> str:
    """Why the kernel is unavailable ('' when it is)."""
    load()
    return _state["why"]


def instruction_path() -> str:
    """Which code path the build took: 'avx512-vnni', 'avx2-vnni', 'avx2' or 'portable'."""
    lib = load()
    return lib.NanochatTernaryPath().decode() if lib is not None else "unavailable"


def matmul(x: jax.Array, tiles: jax.Array) -> jax.Array:
    """Unscaled x [M, K] int8 @ the weights of CPU tiles [NB, K4 / 4, 256] uint8
    (`packing.cpu_tiles`) -> int32 [M, 64 NB] (exact), on the CPU. Raises RuntimeError when
    the kernel is not `available()`."""
    if load() is None:
        raise RuntimeError(f"the CPU ternary kernel is unavailable: {why()}")
    if (x.dtype != jnp.int8 or tiles.dtype != jnp.uint8 or x.ndim != 2 or tiles.ndim != 3
            or tiles.shape[2] != 4 * TILE_COLUMNS):
        raise ValueError(f"cpu_kernel.matmul wants int8 x [M, K] and uint8 CPU tiles "
                         f"[NB, G, {4 * TILE_COLUMNS}], got {x.dtype}{list(x.shape)} and "
                         f"{tiles.dtype}{list(tiles.shape)}")
    if x.shape[1] > 16 * tiles.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns, the tiles hold {16 * tiles.shape[1]}")
    out = jax.ShapeDtypeStruct((x.shape[0], TILE_COLUMNS * tiles.shape[0]), jnp.int32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, tiles)
