"""Metric sinks (JSONL + tensorboardX), memory accounting, model FLOPs and MFU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp

from nanochat_jax.model.config import ModelConfig


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` (one object per step) and `workdir/tb/`;
    `enabled=False` (every process but the first of a multi-host job) writes nothing.

    `resume_step`: the step training resumes from. Rows after it (logged by a run that died
    before its next checkpoint; every row when it is 0, as the run starts over) and a torn
    last line (a kill mid-write) are dropped, so the file reads as one uninterrupted run;
    for TensorBoard the event file opens with tensorboardX's `purge_step`, which hides the
    same events."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0,
                 sinks: tuple = ()):
        """`sinks`: further writers with `write(step, scalars)` and `close()` (train/
        trackers.py's WandbSink) that get every row too."""
        self.enabled = enabled
        self.sinks = sinks
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            _rewind(path, resume_step)
        self._jsonl = open(path, "a")
        # Imported by the first writer, not with this module: tensorboardX imports torch
        # wherever torch is installed (the `hf` extra), which a command refused before
        # training, or a process that never logs, need not wait for (BUILD.md#tests).
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"),
                                 purge_step=resume_step + 1 if resume_step else 0)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        row = {"step": step, **values}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, float(value), step)
        for sink in self.sinks:
            sink.write(step, values)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()
        for sink in self.sinks:
            sink.close()


def _rewind(path: str, step: int) -> None:
    """Keep the complete rows of a metrics.jsonl up to `step` > 0 (atomic rewrite)."""
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if row is not None and 0 < step and row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, PaLM appendix B convention).

    6 x matmul parameters used per token + 12 x d_model x seq_len per attention layer run.
    Matmul parameters: the block kernels once per loop (plus the mHC map projections), the
    LM head once per loop and per MTP depth (each is scored), and per MTP depth one block
    (plus its 2D -> D projection when sequential). The embedding lookup is not counted.
    """
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    block = attn + 3 * cfg.d_model * cfg.d_ff
    n = cfg.mhc_streams
    hyper = 2 * (n * cfg.d_model) * (2 * n + n * n) if n and cfg.mhc_dynamic else 0
    proj = 2 * cfg.d_model * cfg.d_model if cfg.mtp_kind == "sequential" else 0
    matmul_params = (cfg.loops * cfg.n_layers * (block + hyper) + cfg.mtp_depth * (block + proj)
                     + (cfg.loops + cfg.mtp_depth) * cfg.d_model * cfg.vocab_size)
    attention_layers = cfg.loops * cfg.n_layers + cfg.mtp_depth
    return 6.0 * matmul_params + 12.0 * attention_layers * cfg.d_model * seq_len


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet figures of one accelerator (one JAX device: a TPU v4/v5p megacore chip, a
    GPU): memory, dense bf16 FLOP/s and int8 OP/s."""

    hbm_bytes: float
    bf16_flops: float
    int8_ops: float


GiB = 2**30
# device_kind -> Chip, matched exactly, then as a prefix (first match): Google Cloud TPU and
# NVIDIA datasheets (dense, no sparsity)
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip(32 * GiB, 275e12, 275e12),
    "TPU v5 lite": Chip(16 * GiB, 197e12, 394e12),  # v5e
    "TPU v5p": Chip(95 * GiB, 459e12, 918e12),
    "TPU v5": Chip(95 * GiB, 459e12, 918e12),  # v5p reports "TPU v5"
    "TPU v6 lite": Chip(32 * GiB, 918e12, 1836e12),  # v6e (Trillium)
    "NVIDIA B200": Chip(180e9, 2250e12, 4500e12),  # HGX B200, per GPU
    "NVIDIA H200": Chip(141e9, 989e12, 1979e12),
    "NVIDIA H100": Chip(80e9, 989e12, 1979e12),
    "NVIDIA A100-SXM4-40GB": Chip(40e9, 312e12, 624e12),
    "NVIDIA A100": Chip(80e9, 312e12, 624e12),
}


def chip(device_kind: str) -> Chip | None:
    """The datasheet entry of a device kind (None: not in CHIPS, e.g. a CPU)."""
    if device_kind in CHIPS:
        return CHIPS[device_kind]
    return next((c for kind, c in CHIPS.items() if device_kind.startswith(kind)), None)


def peak_flops_per_chip(set_value: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it came from): `set_value` (training.peak_flops,
    per chip) when given; else the bf16 datasheet rate of a device kind in CHIPS; else (a
    CPU) a measured matmul."""
    if set_value:
        return float(set_value), "set"
    known = chip(jax.devices()[0].device_kind)
    if known is not None:
        return known.bf16_flops, "datasheet bf16"
    return measure_peak_flops(), "measured"


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_chip: float,
        devices: int) -> float:
    """Model FLOPs utilisation: the run's model FLOP/s (global tokens/s) over the peak of
    every device it runs on."""
    return tokens_per_sec * flops_per_token / (peak_per_chip * devices)


def measure_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """A measured dense-matmul rate (FLOP/s) on the default device: the MFU denominator when
    the user sets none. fp32 on CPU, bf16 on accelerators (their training dtype)."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_memory() -> dict[str, float]:
    """`memory/peak_device_bytes` of the first local device, where the backend reports it
    (GPU, TPU); empty on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {} if peak is None else {"memory/peak_device_bytes": float(peak)}
