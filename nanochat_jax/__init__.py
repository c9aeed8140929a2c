"""nanochat-jax: ternary-weight (BitNet b1.58) language models in JAX/Flax."""

import glob as _glob
import os as _os

if not _glob.glob("/dev/accel*") and not _glob.glob("/dev/vfio/[0-9]*"):
    # No TPU on this host. With libtpu installed (`.[tpu]`, to compile for TPU topologies:
    # experiments/compile.py) JAX still starts it, and without these it prints a screen of
    # warnings at every start; several processes may load it (pytest -n auto), and with no
    # device there is nothing for its lockfile to guard. Set before JAX is imported.
    _os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    _os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    _os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
