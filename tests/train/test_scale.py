"""Memory levers from the config: gradient accumulation equals one big batch, remat
recomputes instead of storing, bf16 computes in bf16 on fp32 master weights."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from nanochat_jax.errors import ConfigError
from nanochat_jax.losses import Objective
from nanochat_jax.model.config import model_config
from nanochat_jax.model.transformer import Transformer
from nanochat_jax.train import step as step_lib
from nanochat_jax.train.state import init_train_state
from nanochat_jax.train.step import make_train_step
from nanochat_jax.train.trainer import train

TINY = model_config("tiny", vocab_size=384, n_layers=2, seq_len=32)
TOKENS = jax.random.randint(jax.random.key(1), (8, 33), 0, TINY.vocab_size)  # [B, T+1]
OBJECTIVE = Objective(pad_id=-1, vocab_chunk=8192)  # no padding: every token counts


def _steps(grad_accum: int, n: int = 2, tx=None):
    model = Transformer(TINY)
    tx = tx or optax.sgd(0.5)
    state = init_train_state(model, tx, 0, TINY.seq_len)
    step = make_train_step(model, tx, lambda _: 0.5, OBJECTIVE, grad_accum=grad_accum)
    losses = []
    for _ in range(n):
        state, metrics = step(state, TOKENS)
        losses.append(float(metrics["loss/total"]))
    return state, losses


@pytest.mark.slow
def test_k_micro_batches_give_the_update_of_the_whole_batch():
    (whole, whole_losses), (acc, acc_losses) = _steps(1), _steps(4)  # micro-batches of 2
    np.testing.assert_allclose(acc_losses, whole_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(whole.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_accumulation_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ConfigError, match="grad_accum=3 does not divide the batch of 8"):
        _steps(3, n=1)


def _loss(cfg):
    """(cross-entropy of params, params) of a model on TOKENS."""
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), TOKENS[:, :-1])["params"]

    def loss(params):
        h, head = model.apply({"params": params}, TOKENS[:, :-1],
                              method=Transformer.hidden_and_head)
        logits = jnp.dot(h.astype(jnp.float32), head)
        return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

    return loss, params


def _residual_bytes(fn, *args, capsys) -> int:
    """Bytes the backward pass keeps from the forward (jax.ad_checkpoint's own listing)."""
    capsys.readouterr()
    print_saved_residuals(fn, *args)
    sizes = {"f32": 4, "bf16": 2, "i32": 4, "s32": 4, "i8": 1, "s8": 1, "u32": 4, "bool": 1}
    total = 0
    for dtype, dims in re.findall(r"^(\w+)\[([\d,]*)\]", capsys.readouterr().out, re.M):
        total += sizes.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


@pytest.mark.slow
def test_remat_gives_the_same_gradients_and_keeps_fewer_activations(capsys):
    # fake_quant: the ternary layers are plain matmuls, which the "dots" policy may keep
    cfg = dataclasses.replace(TINY, n_layers=4, ternary_product="fake_quant")
    kept, results = {}, {}
    for policy in ("none", "dots", "full"):
        loss, params = _loss(dataclasses.replace(cfg, remat=policy))
        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
        kept[policy] = _residual_bytes(loss, params, capsys=capsys)
    for policy in ("dots", "full"):
        np.testing.assert_allclose(results[policy][0], results["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(results[policy][1]), jax.tree.leaves(results["none"][1]),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    params_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
    activations = {k: v - params_bytes for k, v in kept.items()}
    assert activations["none"] > activations["dots"] > activations["full"] > 0, activations


@pytest.mark.slow
def test_loop_remat_gives_the_same_gradients_and_keeps_only_the_loop_inputs(capsys):
    """remat="loop": each LoopLM loop's pass through the blocks is recomputed in the
    backward; what the backward keeps shrinks below the un-remat'd model's, and below
    per-block "full" remat's (which keeps every block's input in every loop)."""
    cfg = dataclasses.replace(TINY, n_layers=2, loops=2, mhc_streams=2, d_model=64,
                              n_heads=2, n_kv_heads=1, d_ff=128, ternary_product="fake_quant")
    kept, results = {}, {}
    for policy in ("none", "full", "loop"):
        loss, params = _loss(dataclasses.replace(cfg, remat=policy))
        if policy != "full":  # (per-block remat's gradients: the test above)
            results[policy] = jax.jit(jax.value_and_grad(loss))(params)
        kept[policy] = _residual_bytes(loss, params, capsys=capsys)
    np.testing.assert_allclose(results["loop"][0], results["none"][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results["loop"][1]), jax.tree.leaves(results["none"][1]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert kept["none"] > kept["full"] > kept["loop"], kept


def test_the_cpu_schedule_sets_xlas_scheduler_flag_unless_the_user_did():
    flag = step_lib.CPU_SCHEDULER_FLAG
    assert step_lib.cpu_schedule_flags("memory", "") == f"{flag}=false"
    assert step_lib.cpu_schedule_flags("concurrency", "--xla_foo=1") == f"--xla_foo=1 {flag}=true"
    assert step_lib.cpu_schedule_flags("memory", f"{flag}=true") == f"{flag}=true"
    with pytest.raises(ConfigError, match="training.cpu_schedule"):
        step_lib.cpu_schedule_flags("fast", "")


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights_gradients_and_loss():
    cfg = dataclasses.replace(TINY, compute_dtype="bfloat16")
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), TOKENS[:, :-1])["params"]
    hidden, head = model.apply({"params": params}, TOKENS[:, :-1],
                               method=Transformer.hidden_and_head)
    assert hidden.dtype == jnp.bfloat16 and head.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    (loss16, grads16), (loss32, _) = (jax.jit(jax.value_and_grad(_loss(c)[0]))(params)
                                      for c in (cfg, TINY))
    assert loss16.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(loss16, loss32, rtol=1e-2)


@pytest.mark.slow
def test_a_run_with_accumulation_remat_bf16_and_fp4_backward_learns(small_config, tmp_path):
    small_config.training.grad_accum = 2
    small_config.model.remat = "full"
    small_config.model.compute_dtype = "bfloat16"
    small_config.model.fp4_backward = "nvfp4"
    small_config.model.fp4_hadamard = True
    small_config.model.fp4_head = True  # a ternary model: the head is what FP4 reaches
    summary = train(small_config, str(tmp_path))
    assert summary["eval/ce"] < 5.0  # ln(384) = 5.95 at the start


def test_a_batch_the_mesh_and_accumulation_cannot_split_is_refused(small_config, tmp_path):
    small_config.training.grad_accum = 3  # batch 8
    with pytest.raises(ConfigError, match="must be a multiple of mesh.data x mesh.fsdp"):
        train(small_config, str(tmp_path))
