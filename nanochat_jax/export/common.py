"""What every export format shares: the architecture features a one-pass, one-stream BitNet
runtime cannot compute, and the parts left out because they never feed next-token logits."""

from __future__ import annotations

from nanochat_jax.model.config import ModelConfig


def one_pass_problems(cfg: ModelConfig, runtime: str) -> list[str]:
    """LoopLM and mHC, which `runtime` (a BitNet implementation running each layer once on
    one residual stream) cannot compute; empty when the model has neither."""
    problems = []
    if cfg.loops > 1:
        problems.append(f"LoopLM ({cfg.loops} loops): {runtime} runs each layer once")
    if cfg.mhc_streams:
        problems.append(f"mHC ({cfg.mhc_streams} residual streams): {runtime} has one "
                        f"residual stream")
    return problems


def dropped_parts(cfg: ModelConfig) -> list[str]:
    """The parts an export leaves out: the MTP modules (they only draft)."""
    return [f"MTP modules mtp_0..mtp_{cfg.mtp_depth - 1} (they only draft; the trunk's "
            f"next-token logits do not depend on them)"] if cfg.mtp_depth else []
