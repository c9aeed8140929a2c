"""How ternary layers compute: `model.ternary_product` and `model.kernel_backend`, the old
`model.ternary_impl` mapped onto them with one note, bad values refused with the fix."""

import dataclasses

import pytest

from experiments.configs import base
from nanochat_jax.errors import ConfigError
from nanochat_jax.model import config as config_lib
from nanochat_jax.model.config import ModelConfig, from_run_config
from nanochat_jax.ternary import kernel

CFG = dict(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture
def fresh_notes(monkeypatch):
    """No old value noted yet in this process."""
    monkeypatch.setattr(config_lib, "_NOTED", set())


@pytest.mark.parametrize("old, product, backend", [
    ("fake_quant", "fake_quant", "auto"),
    ("auto", "kernel", "auto"),
    ("pallas", "kernel", "pallas"),
    ("interpret", "kernel", "interpret"),
    ("reference", "kernel", "reference"),
])
def test_each_old_ternary_impl_value_maps_to_its_product_and_backend(old, product, backend,
                                                                      fresh_notes):
    cfg = ModelConfig(**CFG, ternary_impl=old)
    assert (cfg.ternary_product, cfg.kernel_backend, cfg.ternary_impl) == (product, backend, None)
    assert cfg.uses_kernel == (product == "kernel")
    assert cfg == ModelConfig(**CFG, ternary_product=product, kernel_backend=backend)


def test_the_old_field_is_noted_in_exactly_one_line_however_often_it_is_seen(fresh_notes,
                                                                            capsys):
    cfg = ModelConfig(**CFG, ternary_impl="fake_quant")
    dataclasses.replace(cfg, n_layers=3)
    dataclasses.replace(cfg, ternary_impl="fake_quant")
    ModelConfig(**CFG, ternary_impl="fake_quant")
    err = capsys.readouterr().err
    assert err.splitlines() == ["note: model.ternary_impl=fake_quant is now "
                                "model.ternary_product=fake_quant model.kernel_backend=auto"]
    ModelConfig(**CFG)
    assert capsys.readouterr().err == ""


def test_a_run_config_takes_the_new_fields_and_still_the_old_one(fresh_notes):
    config = base.get_config()
    config.model.preset = "tiny"
    assert from_run_config(config).uses_kernel
    config.model.kernel_backend = "interpret"
    assert from_run_config(config).kernel_backend == "interpret"
    config.model.ternary_impl = "fake_quant"  # --config.model.ternary_impl=fake_quant
    with pytest.raises(ConfigError, match="disagrees with model.ternary_product=kernel "
                                          "model.kernel_backend=interpret: drop"):
        from_run_config(config)
    config.model.kernel_backend = "auto"
    cfg = from_run_config(config)
    assert (cfg.ternary_product, cfg.kernel_backend) == ("fake_quant", "auto")
    assert not cfg.uses_kernel


def test_an_old_checkpoints_auto_is_the_defaults_and_is_not_noted(fresh_notes, capsys):
    assert ModelConfig(**CFG, ternary_impl="auto") == ModelConfig(**CFG)
    assert ModelConfig(**CFG, ternary_impl="pallas", kernel_backend="pallas").kernel_backend \
        == "pallas"  # the new fields already say the same: accepted
    assert "ternary_impl=auto" not in capsys.readouterr().err


def test_only_a_compiled_kernel_has_tilings_to_tune(monkeypatch):
    """`tunes_kernel`: the kernel product on a backend that resolves to Pallas (as on a GPU
    or TPU), not the reference or interpret backends, nor fake_quant."""
    monkeypatch.setattr(kernel, "resolve_impl",
                        lambda impl, platform=None: "pallas" if impl in ("auto", "pallas")
                        else impl)
    assert ModelConfig(**CFG).tunes_kernel
    assert ModelConfig(**CFG, kernel_backend="pallas").tunes_kernel
    assert not ModelConfig(**CFG, kernel_backend="reference").tunes_kernel
    assert not ModelConfig(**CFG, ternary_product="fake_quant").tunes_kernel
    assert not ModelConfig(**CFG, ternary=False).tunes_kernel
    monkeypatch.undo()
    assert not ModelConfig(**CFG).tunes_kernel  # this CPU: the jnp reference


def test_a_dense_model_never_uses_the_kernel():
    assert not ModelConfig(**CFG, ternary=False).uses_kernel
    assert ModelConfig(**CFG).uses_kernel


@pytest.mark.parametrize("fields, message", [
    (dict(ternary_product="pallas"),
     "model.ternary_product=pallas is a value of model.kernel_backend: set "
     "model.kernel_backend=pallas and model.ternary_product to one of kernel, fake_quant"),
    (dict(kernel_backend="fake_quant"),
     "model.kernel_backend=fake_quant is a value of model.ternary_product: set "
     "model.ternary_product=fake_quant and model.kernel_backend to one of auto, pallas, "
     "interpret, reference"),
    (dict(kernel_backend="triton"),
     "unknown model.kernel_backend 'triton': choose one of auto, pallas, interpret, reference"),
    (dict(ternary_product="int8"),
     "unknown model.ternary_product 'int8': choose one of kernel, fake_quant"),
    (dict(ternary_impl="triton"),
     "unknown model.ternary_impl 'triton' .*: set model.ternary_product to one of kernel, "
     "fake_quant and model.kernel_backend to one of auto, pallas, interpret, reference"),
])
def test_bad_values_are_refused_with_the_field_and_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**CFG, **fields)
