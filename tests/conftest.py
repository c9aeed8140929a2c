"""Shared fixtures: a private corpus cache, and a tiny, fast run config on real text."""

import glob
import os
import shutil
import struct
import tempfile

# On a GPU, every process (each xdist worker) would take 75% of its memory at start-up: the
# tests share one device, so each takes what it uses. Set before JAX starts a backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from experiments.configs import e3, tiny  # noqa: E402
from nanochat_jax.train.sharding import prepare_libtpu_without_tpu  # noqa: E402

# The session starts every backend JAX has, libtpu's too where it is installed (CI installs it
# to compile for TPU topologies), in each xdist worker and runner subprocess: its settings for
# a host without a TPU go into the environment before the first `jax.devices()`.
prepare_libtpu_without_tpu()

# Broadcasting must be spelled out: `x * scale[None, None]`, not a silent rank promotion
# that would also accept a transposed or wrongly shaped operand.
jax.config.update("jax_numpy_rank_promotion", "raise")

# The tests' float32 references mean float32 products: on a GPU, JAX's default precision
# multiplies float32 matrices in TF32 (10-bit mantissas), which no fp32 tolerance here holds.
if jax.devices()[0].platform != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")

# `NANOCHAT_TEST_AS_BACKEND=gpu` (experiments/gpu_check.sh's dry run on a CPU): the code's
# platform decisions (`jax.default_backend()`, hence ternary/kernel.py's `target_platform`
# with no mesh) see that backend while arrays stay on this host's CPU, so a test whose
# expectation holds only on a CPU fails here instead of on the GPU; tests marked `cpu_only`
# skip as they would there. Tests that run compiled kernels ask for a real device
# (`jax.devices()[0].platform`) and skip.
AS_BACKEND = os.environ.get("NANOCHAT_TEST_AS_BACKEND")
if AS_BACKEND:
    jax.default_backend = lambda: AS_BACKEND

CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """One persistent compilation cache per test run, shared by the xdist workers and the
    runner subprocesses (through the environment): tests that compile the same program
    (the same small train step in another test, another process) load it instead of
    compiling it again. It starts empty, so a run's time is a fresh machine's. A cache
    named in the environment is used as it is."""
    if CACHE_ENV in os.environ and not hasattr(config, "workerinput"):
        return
    if not hasattr(config, "workerinput"):  # the controller (or the only process)
        path = tempfile.mkdtemp(prefix="nanochat_jax_compile_cache_")
        os.environ[CACHE_ENV] = path
        config._nanochat_cache = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_runtest_setup(item):
    """`@pytest.mark.cpu_only("why")`: the test checks what only a CPU backend does."""
    marker = item.get_closest_marker("cpu_only")
    if marker and jax.default_backend() != "cpu":
        why = marker.args[0] if marker.args else "a CPU-only path"
        pytest.skip(f"checks {why}: runs where the backend is a CPU (here "
                    f"{jax.default_backend()})")


def pytest_unconfigure(config):
    """The run's own cache goes when the run ends (the controller outlives its workers)."""
    path = getattr(config, "_nanochat_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def corpus_cache(tmp_path_factory):
    """Corpora built by tests (and by runner subprocesses) go to a temporary cache."""
    path = str(tmp_path_factory.mktemp("nanochat_cache"))
    old = os.environ.get("NANOCHAT_CACHE")
    os.environ["NANOCHAT_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("NANOCHAT_CACHE")
    else:
        os.environ["NANOCHAT_CACHE"] = old


def _shrink(c):
    """Shrink a tiny config so an end-to-end run takes seconds on 2 cores."""
    c.model.n_layers = 2
    c.model.seq_len = 64
    c.data.batch_size = 8
    c.training.log_every = 1
    c.training.eval_batches = 2
    c.training.peak_flops = 1e11  # skip the matmul measurement
    c.optimizer.warmup_steps = 2
    c.checkpoint.every = 4
    return c


def _small():
    c = _shrink(tiny.get_config())
    c.data.max_bytes = 600_000
    c.training.steps = 12
    c.training.eval_every = 6
    return c


@pytest.fixture
def small_config():
    """tiny (byte-level, Python stdlib), 12 steps."""
    return _small()


@pytest.fixture(scope="session")
def make_small_config():
    """A function returning a fresh small_config (for module- and session-scoped fixtures)."""
    return _small


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A checkpoint to load: small_config with MTP (depth 1) trained 6 steps.
    -> (workdir, config, the run's summary)."""
    c = _shrink(tiny.get_config())
    c.data.max_bytes = 600_000
    c.training.steps = c.training.eval_every = 6
    c.mtp.enabled = True
    workdir = str(tmp_path_factory.mktemp("trained_run"))
    from nanochat_jax.train.trainer import train

    return workdir, c, train(c, workdir)


def _small_rust(c):
    """A rust-src config with a 1k BPE on 2 MB of it."""
    c = _shrink(c)
    c.model.vocab_size = c.data.vocab_size = 1024
    c.data.max_bytes = 2_000_000
    return c


@pytest.fixture
def small_rust_config():
    """tiny:rust (rust-src) with a 1k BPE on 2 MB of it."""
    return _small_rust(tiny.get_config("rust"))


@pytest.fixture
def small_e3_full_config():
    """e3:full (every architecture feature, GaLore 2 + 8-bit Muon), small, on the 1k BPE."""
    return _small_rust(e3.get_config("full"))


@pytest.fixture
def small_rust_gguf_config():
    """tiny:rust,gguf (tied, SwiGLU, 256 wide: llama.cpp-exportable) on the 1k BPE."""
    return _small_rust(tiny.get_config("rust,gguf"))


def _fit_adam(loss, params, steps: int, learning_rate: float):
    """params after `steps` Adam steps (one jitted step, run from Python) on `loss(params)`."""
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt):
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for _ in range(steps):
        params, opt = step(params, opt)
    return params


@pytest.fixture(scope="session")
def fit_adam():
    """`(loss, params, steps, learning_rate) -> params`: a model fitted for a moment (to a
    repeating token cycle in tests/export and tests/infer, for decisive logits)."""
    return _fit_adam


@pytest.fixture(scope="session")
def tensorboard_events():
    """A function: the Event records of a TensorBoard event file, or of every one in a logdir
    (TFRecords: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    def events(path) -> list:
        paths = (sorted(glob.glob(os.path.join(path, "events.out.tfevents*")))
                 if os.path.isdir(path) else [path])
        out = []
        for p in paths:
            with open(p, "rb") as f:
                data = f.read()
            offset = 0
            while offset < len(data):
                (length,) = struct.unpack_from("<Q", data, offset)
                out.append(Event.FromString(data[offset + 12:offset + 12 + length]))
                offset += 12 + length + 4
        return out

    return events
