"""Model hyper-parameters and the size presets (the model zoo).

`python -m experiments.zoo` prints every preset with its sizes and the run that
trains it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from nanochat_jax.errors import ConfigError
from nanochat_jax.ternary import kernel
from nanochat_jax.ternary.fp4 import Backward
from nanochat_jax.ternary.kernel import IMPLS, target_platform

# How a ternary layer forms its product: "kernel", the packed-weight ternary matmul
# (ternary/linear.py `ternary_dot`, straight-through VJP), or "fake_quant", quantise then a
# float matmul (autodiff STE).
TERNARY_PRODUCTS = ("kernel", "fake_quant")
# Which ternary matmul runs the kernel product (ternary/kernel.py `IMPLS`): "auto" is Pallas
# on GPU/TPU, the jnp reference on a CPU.
KERNEL_BACKENDS = IMPLS
DEFAULT_TERNARY_PRODUCT, DEFAULT_KERNEL_BACKEND = "kernel", "auto"
# The one field these two replace, each of its values as (ternary_product, kernel_backend):
# still accepted, with a one-line note (`_legacy_ternary_impl`).
TERNARY_IMPLS = {"fake_quant": ("fake_quant", "auto"),
                 **{backend: ("kernel", backend) for backend in KERNEL_BACKENDS}}
MTP_KINDS = ("sequential", "parallel")
FFN_ACTIVATIONS = ("relu2", "silu")
REMAT_POLICIES = ("none", "full", "dots", "loop")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# Platforms whose "auto" compute dtype is bfloat16: their matrix units run bf16 at full rate
# (fp32 is TF32 or several passes); a CPU keeps float32, measured fastest there (BUILD.md).
BF16_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")
# fields that change how the model computes, not which model it is: a run may resume with
# other values
HOW_IT_COMPUTES = ("ternary_product", "kernel_backend", "ternary_impl", "compute_dtype",
                   "remat", "fp4_backward", "fp4_hadamard", "fp4_head")
FP4_BACKWARD = ("none", "nvfp4", "mxfp4")
CHOICES = {"ternary_product": TERNARY_PRODUCTS, "kernel_backend": KERNEL_BACKENDS,
           "ffn_activation": FFN_ACTIVATIONS, "compute_dtype": COMPUTE_DTYPES,
           "fp4_backward": FP4_BACKWARD, "remat": REMAT_POLICIES}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a BitNet decoder (docs/techniques.md#bitnet); ternary=False: dense twin."""

    vocab_size: int
    seq_len: int  # training context length (rotary tables are built on the fly)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # grouped-query attention when < n_heads
    d_ff: int  # hidden width of the gated FFN
    ternary: bool = True
    # How ternary layers compute (TERNARY_PRODUCTS, KERNEL_BACKENDS above)
    ternary_product: str = DEFAULT_TERNARY_PRODUCT
    kernel_backend: str = DEFAULT_KERNEL_BACKEND
    # The old spelling of the pair, one of TERNARY_IMPLS: mapped to it, then None
    ternary_impl: str | None = None
    tie_embeddings: bool = False
    # Gate of the FFN: "relu2" (BitNet b1.58's squared ReLU) or "silu" (SwiGLU, what
    # llama.cpp's `bitnet` architecture computes: GGUF export needs it).
    ffn_activation: str = "relu2"
    # How it computes (not what: a run may change these on resume). `compute_dtype`
    # bfloat16: activations and matmuls in bf16, parameters (the fp32 master weights),
    # norms' statistics, softmax and the loss in fp32; "auto": bfloat16 where the model is
    # compiled for a GPU or TPU, float32 on a CPU (`resolve_compute_dtype`). `remat`:
    # recompute each block's activations in the backward pass: "full" saves only block
    # inputs, "dots" also the matmul outputs
    # (jax.checkpoint_policies.dots_with_no_batch_dims_saveable); "loop" saves only the input
    # of each pass through the block stack (each LoopLM loop) and recomputes the pass in the
    # backward.
    compute_dtype: str = "auto"
    remat: str = "none"
    # FP4 (ternary/fp4.py) for the backward pass of a dense model's linear layers and, with
    # fp4_head, of the LM head (simulated: ternary/fp4.py, docs/techniques.md#fp4)
    fp4_backward: str = "none"
    fp4_hadamard: bool = False  # random 16x16 Hadamard on the weight-gradient operands
    fp4_head: bool = False  # the LM head's backward in FP4 too (NVIDIA's recipe keeps it BF16)
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Multi-token prediction (docs/techniques.md#mtp): `mtp_depth` extra future tokens, predicted by
    # DeepSeek-V3 "sequential" modules or Gloeckle et al. "parallel" heads; 0 = off.
    mtp_depth: int = 0
    mtp_kind: str = "sequential"
    # LoopLM (docs/techniques.md#looplm): the stack run `loops` times with shared weights and an
    # exit gate after every loop; 1 = the plain stack.
    loops: int = 1
    # mHC (docs/techniques.md#mhc): residual stream widened to `mhc_streams` copies mixed by
    # Sinkhorn-projected maps; 0 = the plain residual.
    mhc_streams: int = 0
    mhc_sinkhorn_iters: int = 20
    mhc_dynamic: bool = True  # input-dependent maps; False: static (learned constants)
    # The block stack as one `nn.scan` over layers: parameters stacked `blocks/block/...`
    # with a leading [n_layers] axis, one block traced and compiled whatever the depth.
    # A parameter layout, not only a way to compute: a checkpoint resumes with its own
    # setting; inference and export take the unrolled layout (`params.unscan`).
    scan_layers: bool = False

    def __post_init__(self):
        if self.ternary_impl is not None:
            product, backend = _legacy_ternary_impl(
                self.ternary_impl, (self.ternary_product, self.kernel_backend))
            object.__setattr__(self, "ternary_product", product)
            object.__setattr__(self, "kernel_backend", backend)
            object.__setattr__(self, "ternary_impl", None)
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by "
                              f"model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of "
                              f"model.n_kv_heads={self.n_kv_heads}")
        for name, other in (("ternary_product", "kernel_backend"),
                            ("kernel_backend", "ternary_product")):
            value = getattr(self, name)
            if value not in CHOICES[name] and value in CHOICES[other]:
                raise ConfigError(f"model.{name}={value} is a value of model.{other}: set "
                                  f"model.{other}={value} and model.{name} to one of "
                                  f"{', '.join(CHOICES[name])}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown model.{name} {getattr(self, name)!r}: choose one "
                                  f"of {', '.join(choices)}")
        for name in ("mtp_depth", "mhc_streams", "mhc_sinkhorn_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.loops < 1:
            raise ConfigError(f"the loop count must be >= 1, got {self.loops}")
        if self.mtp_kind not in MTP_KINDS:  # set by mtp.kind
            raise ConfigError(f"unknown MTP kind {self.mtp_kind!r}: choose one of "
                              f"{', '.join(MTP_KINDS)}")
        if self.fp4_backward != "none" and self.ternary and not self.fp4_head:
            raise ConfigError(f"model.fp4_backward={self.fp4_backward} on a ternary model: its "
                              f"only non-ternary matmul is the LM head, which stays in full "
                              f"precision unless model.fp4_head=True")
        if self.fp4_head and self.fp4_backward == "none":
            raise ConfigError("model.fp4_head=True needs model.fp4_backward=nvfp4 or mxfp4")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")

    @property
    def uses_kernel(self) -> bool:
        """Whether the ternary layers multiply through the packed-weight kernel (on
        `kernel_backend`): what decides packing for decode and tuning the kernel's tiles."""
        return self.ternary and self.ternary_product == "kernel"

    @property
    def tunes_kernel(self) -> bool:
        """Whether the kernel runs compiled (Pallas on a GPU or TPU, what `kernel_backend`
        resolves to here), so its tilings are worth timing."""
        return self.uses_kernel and kernel.resolve_impl(self.kernel_backend) == "pallas"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def fp4_head_backward(self):
        """The LM head's FP4 backward (None: full precision)."""
        return self.fp4 if self.fp4_head else None

    @property
    def fp4(self):
        """The FP4 backward of the dense linear layers (None: full precision)."""
        return None if self.fp4_backward == "none" else Backward(self.fp4_backward,
                                                                  self.fp4_hadamard)

    @property
    def dtype(self):
        """The activation dtype: `compute_dtype` as a jnp dtype, "auto" resolved for the
        platform being compiled for (`resolve_compute_dtype`)."""
        return jnp.dtype(resolve_compute_dtype(self.compute_dtype))


_NOTED: set[str] = set()  # the old ternary_impl values already noted in this process


def _legacy_ternary_impl(value: str, given: tuple[str, str]) -> tuple[str, str]:
    """(ternary_product, kernel_backend) of an old `model.ternary_impl` value, with one line
    on stderr the first time each value that changes the defaults is seen. `given`: the new
    fields as set; left at their defaults they take the old value's meaning, set otherwise
    they must agree with it (an old checkpoint's "auto" is the defaults: no note)."""
    if value not in TERNARY_IMPLS:
        raise ConfigError(f"unknown model.ternary_impl {value!r} (the old spelling of "
                          f"model.ternary_product and model.kernel_backend): set "
                          f"model.ternary_product to one of {', '.join(TERNARY_PRODUCTS)} and "
                          f"model.kernel_backend to one of {', '.join(KERNEL_BACKENDS)}")
    product, backend = TERNARY_IMPLS[value]
    defaults = (DEFAULT_TERNARY_PRODUCT, DEFAULT_KERNEL_BACKEND)
    if given not in (defaults, (product, backend)):
        raise ConfigError(f"model.ternary_impl={value} (the old spelling: "
                          f"model.ternary_product={product} model.kernel_backend={backend}) "
                          f"disagrees with model.ternary_product={given[0]} "
                          f"model.kernel_backend={given[1]}: drop model.ternary_impl")
    if (product, backend) != defaults and value not in _NOTED:
        _NOTED.add(value)
        print(f"note: model.ternary_impl={value} is now model.ternary_product={product} "
              f"model.kernel_backend={backend}", file=sys.stderr)
    return product, backend


def resolve_compute_dtype(compute_dtype: str, platform: str | None = None) -> str:
    """"float32" or "bfloat16": `compute_dtype` itself, or for "auto" bfloat16 on a GPU or
    TPU and float32 elsewhere. `platform` defaults to the one being compiled for: the mesh
    in context's, else the default backend's (ternary/kernel.py `target_platform`)."""
    if compute_dtype != "auto":
        return compute_dtype
    return "bfloat16" if (platform or target_platform()) in BF16_PLATFORMS else "float32"


# name -> architecture only: the vocabulary and sequence length are the run's (model_config).
PRESETS: dict[str, dict[str, Any]] = {
    # Trains in minutes on 2 CPU cores on a byte-level tokenizer.
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    # The smallest geometry llama.cpp's ternary GGUF types (TQ1_0/TQ2_0) can hold: every
    # ternary layer's input width a multiple of 256.
    "tiny256": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768),
    # nanochat's d20 geometry (depth 20, width 64 * depth).
    "d20": dict(d_model=1280, n_layers=20, n_heads=10, n_kv_heads=10, d_ff=3584),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2816),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192),
    # BitNet b1.58 2B4T-like width with Llama-3.2-3B depth.
    "3b": dict(d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, d_ff=8192),
    # Llama-2-7B geometry.
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008),
}

_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
# what every model_config call names: the run's values, never a preset's
RUN_FIELDS = ("vocab_size", "seq_len")


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """A preset's architecture with `vocab_size` and `seq_len` (the tokenizer's and the run's,
    never the preset's) and any other fields replaced; None-valued overrides keep the
    preset's value."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}: choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - _FIELDS
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}: fields are {sorted(_FIELDS)}")
    fields = dict(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    missing = [name for name in RUN_FIELDS if name not in fields]
    if missing:
        raise ConfigError(f"model_config({preset!r}) needs {' and '.join(missing)}: a preset "
                          f"holds the architecture only (the tokenizer decides the vocabulary, "
                          f"the run its sequence length)")
    return ModelConfig(**fields)


def from_run_config(config: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of a whole run config: the `model` group plus the architecture parts of
    the `mtp`, `loop` and `mhc` groups where they are enabled."""
    fields = dict(config["model"])
    mtp, loop, mhc = (config.get(name) for name in ("mtp", "loop", "mhc"))
    if mtp and mtp["enabled"]:
        fields.update(mtp_depth=mtp["depth"], mtp_kind=mtp["kind"])
    if loop and loop["enabled"]:
        fields.update(loops=loop["max_loops"])
    if mhc and mhc["enabled"]:
        fields.update(mhc_streams=mhc["streams"], mhc_sinkhorn_iters=mhc["sinkhorn_iters"],
                      mhc_dynamic=mhc["dynamic"])
    return model_config(fields.pop("preset"), **fields)
